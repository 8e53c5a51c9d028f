"""What a trained model does with its context: branch gates, loss by position, selection picks.

Each function runs the bare model (DDP and torch.compile wrappers are peeled off, since hooks on the
submodules of a compiled model do not fire reliably) under torch.no_grad in eval mode, and leaves its
train/eval mode as it found it. Inputs go on the model's device; the caller picks any autocast.
"""

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nsa.attention import SparseAttention

BRANCHES = ("cmp", "slc", "win")  # the order of NSA's gates (docs/SPEC.md section 1)


def unwrap(model):
    """The Transformer inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def nsa_layers(model):
    """Indices of the blocks whose attention is NSA (empty for a dense model)."""
    return [i for i, b in enumerate(unwrap(model).blocks) if isinstance(b.attn, SparseAttention)]


@contextlib.contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def branch_gates(model, tokens):
    """Mean sigmoid gate per branch (cmp, slc, win) of every NSA layer on tokens [B, T]:
    [num_nsa_layers, 3] float32 on the CPU, averaged over batch, time and query heads.

    Read with forward hooks on each layer's `attn.to_gates`, so it sees exactly the gates the forward
    used. ValueError for a model without NSA layers."""
    model = unwrap(model)
    layers = nsa_layers(model)
    if not layers:
        raise ValueError("the model has no NSA layers (model.attention is dense), so it has no branch gates")
    means = {}

    def hook_for(i, heads):
        def hook(module, inputs, out):
            g = torch.sigmoid(out.float()).view(*out.shape[:-1], heads, len(BRANCHES))
            means[i] = g.mean(dim=tuple(range(g.dim() - 1)))
        return hook

    handles = [model.blocks[i].attn.to_gates.register_forward_hook(hook_for(i, model.blocks[i].attn.heads))
               for i in layers]
    try:
        with _evaluating(model):
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([means[i] for i in layers]).cpu()


def loss_by_position(model, batches):
    """Mean loss in bits per byte at every position of the window: [T] float64 on the CPU, over
    `batches`, an iterable of (x, y) [B, T] byte tensors that all share one T."""
    model = unwrap(model)
    total, count = None, 0
    with _evaluating(model):
        for x, y in batches:
            logits, _ = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            per_pos = nats.sum(0).double().cpu()
            if total is not None and per_pos.shape != total.shape:
                raise ValueError(f"windows of different lengths ({total.shape[0]} and {per_pos.shape[0]}): "
                                 "loss by position needs one window length")
            total = per_pos if total is None else total + per_pos
            count += y.shape[0]
    if count == 0:
        raise ValueError("no windows to evaluate (the split is shorter than one window?)")
    return total / count / math.log(2)


def bucket_means(values, bucket):
    """[T] -> [ceil(T / bucket)]: the mean of each run of `bucket` consecutive values (the last run
    may be shorter)."""
    if bucket <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket}")
    T = values.shape[0]
    bins = torch.arange(T) // bucket
    sums = torch.zeros(-(-T // bucket), dtype=values.dtype).index_add_(0, bins, values)
    return sums / torch.bincount(bins).to(values.dtype)


def selection_picks(model, tokens, layer):
    """The top-n selection blocks NSA block `layer` picked on tokens [B, T]: [B, T, Hs, n] int on the
    CPU, ascending, -1 for unused slots; Hs is the kv heads with shared selection, else the query heads.

    Recorded from the layer's own `select` during an ordinary forward, so the picks are those of the
    configured backend with no copy of its arguments here."""
    model = unwrap(model)
    layers = nsa_layers(model)
    if layer not in layers:
        raise ValueError(f"block {layer} is not an NSA layer (NSA layers: {layers or 'none'})")
    attn = model.blocks[layer].attn
    picked = []

    def recording_select(*args, **kwargs):
        result = type(attn).select(attn, *args, **kwargs)
        picked.append(result[0])
        return result

    attn.select = recording_select  # an instance attribute shadows the method for this forward only
    try:
        with _evaluating(model):
            model(tokens)
    finally:
        del attn.select
    return picked[0].cpu()


def selection_map(indices, num_blocks, rows=None):
    """Picks of one sequence, indices [T, Hs, n] -> [Hs, rows, num_blocks] float: the fraction of the
    queries in each of `rows` equal query bins (default: one per query) that picked each block."""
    T, Hs, _ = indices.shape
    idx = torch.where(indices < 0, num_blocks, indices).long()
    hit = torch.zeros(T, Hs, num_blocks + 1).scatter_(-1, idx, 1.0)[..., :num_blocks].permute(1, 0, 2)
    rows = T if rows is None else max(1, min(rows, T))
    bins = torch.arange(T) * rows // T
    sums = torch.zeros(Hs, rows, num_blocks).index_add_(1, bins, hit)
    return sums / torch.bincount(bins, minlength=rows).clamp_min(1)[None, :, None].float()


# --- Shared by the analysis scripts (scripts/eval_context.py, eval_retrieval.py, plot_selection.py) ------


def device_and_autocast(name):
    """'auto' | 'cpu' | 'cuda' -> (torch.device, autocast context): bf16 autocast on CUDA, as train.py
    runs it by default; fp32 on the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    return device, autocast


def run_label(path):
    """A short name for a checkpoint given as a run directory or a file: the run directory's name."""
    path = Path(path)
    return path.name if path.is_dir() else path.resolve().parent.name


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[plot]')") from None
    return plt
