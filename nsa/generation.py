"""Text generation: checkpoint loading, prefill + cached decode steps, sampling.

`generate` runs the prompt through the model's parallel forward once (`Transformer.prefill`, which
fills a preallocated `nsa.cache.ModelCache`), then one `Transformer.decode_step` per new token. The
step has static shapes and never synchronises with the host, so on CUDA it can be captured once in a
CUDA graph (`cuda_graph=True`; `compile=True` torch.compiles it first) and replayed for every token.
The sequences of a batch advance together, so the host knows which steps finish a compressed block
(one in compress_stride): only those run the compression network (a second graph), the others skip it.
`use_cache=False` instead reruns the full forward on the whole sequence each step: slow, for
comparison and tests.
"""

import time

import torch

from nsa.cache import SparseCache
from nsa.checkpoint import model_from_checkpoint
from nsa.ops.common import completes_block


def load_model(path, device="cpu", dtype=None):
    """Rebuild the model of a checkpoint (a file or a run directory holding ckpt.pt) on `device`.

    dtype (e.g. torch.bfloat16) casts the weights, keeping the rotary frequencies in fp32 (positions
    past 256 are not representable in bf16). Returns (model in eval mode, Config)."""
    model, cfg = model_from_checkpoint(path, device)
    if dtype is not None:
        cast_model(model, dtype)
    return model, cfg


def cast_model(model, dtype):
    """Cast weights to dtype, keeping rotary frequencies in fp32."""
    from rotary_embedding_torch import RotaryEmbedding

    model.to(dtype=dtype)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.float()
    return model


# --- Sampling ---------------------------------------------------------------------------------


def sample(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Next tokens [B] int64 from logits [B, V]: greedy (argmax), or temperature / top-k / top-p
    (nucleus) sampling with a seeded torch.Generator. top_k <= 0 or None and top_p >= 1 or None are off."""
    logits = logits.float()
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already cover top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --- Generation -------------------------------------------------------------------------------


class Stats(dict):
    """prefill_ms, decode_s, new_tokens, tokens_per_s (decode, all sequences), peak_mem_bytes."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
             generator=None, use_cache=True, compile=False, cuda_graph=False, max_len=None, on_logits=None):
    """Continue prompt [B, T] (int64 byte ids) by max_new_tokens tokens.

    Returns (tokens [B, T + max_new_tokens], Stats). `max_len` sizes the cache (default T + new tokens).
    `on_logits(step, logits)` (optional) sees the logits [B, V] each new token is sampled from (tests).
    """
    device = prompt.device
    B, T = prompt.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one byte")
    max_len = T + max_new_tokens if max_len is None else max_len
    if T + max_new_tokens > max_len:
        raise ValueError(f"prompt ({T} tokens) + {max_new_tokens} new tokens exceed the cache length {max_len}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = prompt
    stats = Stats(new_tokens=max_new_tokens, batch=B, prompt_tokens=T)

    _sync(device)
    t0 = time.perf_counter()
    if use_cache:
        from nsa.cache import ModelCache

        cache = ModelCache(model, B, max_len, device=device)
        logits = model.prefill(prompt, cache)[:, -1]
    else:
        logits = model(prompt)[0][:, -1]
    _sync(device)
    t1 = time.perf_counter()
    stats["prefill_ms"] = (t1 - t0) * 1e3

    step = None
    l, d = model.cfg.nsa.compress_block, model.cfg.nsa.compress_stride
    if use_cache and max_new_tokens > 1:
        step = make_step(model, cache, compile=compile, cuda_graph=(cuda_graph or compile) and device.type == "cuda")
    _sync(device)
    t2 = time.perf_counter()
    for i in range(max_new_tokens):
        if on_logits is not None:
            on_logits(i, logits)
        tok = sample(logits, temperature, top_k, top_p, greedy, generator)
        out[:, T + i] = tok
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits = step(tok, completes_block(T + i, l, d))  # this token is at position T + i
        else:
            logits = model(out[:, : T + i + 1])[0][:, -1]
    _sync(device)
    t3 = time.perf_counter()
    stats["setup_ms"] = (t2 - t1) * 1e3
    stats["decode_s"] = t3 - t2
    stats["tokens_per_s"] = max_new_tokens * B / max(t3 - t2, 1e-9)
    stats["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out, stats


def make_step(model, cache, compile=False, cuda_graph=False):
    """A function step(tok [B], compress=True) -> logits [B, V] that runs one decode step and advances
    the cache; compress=False (`Transformer.decode_step`) only where no token finishes a block.

    cuda_graph: capture the step in a CUDA graph and replay it (inputs copied into a static buffer);
    with NSA layers that compress, one graph with the compression and one without, sharing a memory
    pool. compile: torch.compile the step first, which fuses its many small ops (rotary, cache writes,
    the compression of a finished block); `generate` graphs a compiled step on GPU too. Our own
    capture, not mode="reduce-overhead": the step mutates the caches, which that mode's graph trees
    handle by re-recording. The returned logits of a graphed step are a static buffer, overwritten by
    the next call."""
    fn = model.decode_step
    if compile:
        _capacity_dynamic(cache)
        fn = torch.compile(fn, fullgraph=False)
    if not cuda_graph:
        return lambda tok, compress=True: fn(tok, cache, compress)
    return _graphed_step(fn, cache)


def _capacity_dynamic(cache):
    """Compile the step for any cache capacity (the caches' dim 1) from the first call, so that a
    generation of another length recompiles nothing (a compiled step is reused across `generate` calls:
    torch.compile caches by code)."""
    for layer in cache.layers:
        for x in vars(layer).values():
            if isinstance(x, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(x, 1)


def _graphed_step(fn, cache):
    B = cache.batch
    device = cache.lengths.device
    static_tok = torch.zeros(B, dtype=torch.long, device=device)
    saved = cache.lengths.clone()
    compresses = any(isinstance(c, SparseCache) and c.num_blocks > 0 for c in cache.layers)
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for compress in (True, False) if compresses else (True,):
        # Warm up on a side stream (Triton autotuning / lazy init), then capture; the cache writes this
        # does are at the current positions and are overwritten by the real steps, and lengths is restored.
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(static_tok, cache, compress)
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = fn(static_tok, cache, compress)
        cache.lengths.copy_(saved)
        graphs[compress] = graph, logits

    def step(tok, compress=True):
        graph, logits = graphs[compress or not compresses]
        static_tok.copy_(tok)
        graph.replay()
        return logits

    return step
