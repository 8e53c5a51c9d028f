"""Configuration: dataclasses filled from YAML, with `section.key=value` command-line overrides.

Every field is documented where it is declared. Unknown keys, duplicate keys in a file, wrong types
and invalid values raise `ConfigError` naming the full key (`model.nsa.window`); so do, in
`Config.check_runnable`, combinations that could not train on this machine. The resolved config
(`to_dict`) is saved with every run and checkpoint.
"""

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class NSAConfig:
    """Native Sparse Attention hyperparameters (docs/SPEC.md section 1). Paper: 32/16/64/16/512."""

    compress_block: int = 32  # l: tokens per compressed block
    compress_stride: int = 16  # d: stride between compressed blocks; divides l and sel_block
    compress_net: Literal["mlp", "mean", "conv", "attn"] = "mlp"  # phi, see nsa/compress.py
    compress_expand: float = 1.0  # hidden width of the mlp compressor, in multiples of dim_head
    num_mem: int = 1  # m: learned memory key/values every query sees in the compressed branch
    sel_block: int = 64  # l': tokens per selection block
    num_selected: int = 16  # n: selected blocks per query, forced ones included
    num_initial: int = 1  # forced initial blocks (block 0, ...)
    num_local: int = 2  # forced local blocks (the query's own block and the one before)
    window: int = 512  # w: sliding-window length, the query's own token included
    shared_selection: bool = True  # one block set per kv head (GQA-shared) vs per query head
    diff_topk: bool = False  # straight-through gate so the top-n passes gradient to importance
    separate_kv: bool = False  # separate key/value projections per branch (paper 3.3.3)
    causal: bool = True  # False: bidirectional (every block visible), torch/flex backends only
    backend: Literal["auto", "torch", "flex", "triton"] = "auto"  # auto: triton on CUDA, else torch

    def validate(self):
        p = "model.nsa."
        _require(self.compress_stride > 0 and self.compress_block > 0,
                 f"{p}compress_block and {p}compress_stride must be positive")
        _require(self.compress_block % self.compress_stride == 0,
                 f"{p}compress_stride ({self.compress_stride}) must divide {p}compress_block ({self.compress_block})")
        _require(self.sel_block > 0 and self.sel_block % self.compress_stride == 0,
                 f"{p}compress_stride ({self.compress_stride}) must divide {p}sel_block ({self.sel_block})")
        _require(self.num_mem >= 0, f"{p}num_mem must be >= 0")
        _require(self.num_initial >= 0 and self.num_local >= 0, f"{p}num_initial and {p}num_local must be >= 0")
        forced = self.num_initial + self.num_local
        _require(self.num_selected > forced,
                 f"{p}num_selected ({self.num_selected}) must exceed the forced blocks "
                 f"({p}num_initial + {p}num_local = {forced})")
        _require(self.window > 0, f"{p}window must be positive")
        _require(self.compress_expand > 0, f"{p}compress_expand must be positive")


@dataclass
class ModelConfig:
    vocab_size: int = 256  # bytes
    dim: int = 512
    depth: int = 6
    heads: int = 8  # query heads HQ
    kv_heads: int = 4  # key/value heads H; heads must be a multiple (G = heads / kv_heads)
    dim_head: int = 64
    ff_mult: float = 4.0  # feed-forward hidden width = ff_mult * dim
    attention: Literal["nsa", "dense"] = "nsa"  # dense: causal SDPA, the A/B baseline
    rotary_base: float = 10000.0
    nsa: NSAConfig = field(default_factory=NSAConfig)

    def validate(self):
        for name in ("vocab_size", "dim", "depth", "heads", "kv_heads", "dim_head"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive")
        _require(self.heads % self.kv_heads == 0,
                 f"model.heads ({self.heads}) must be divisible by model.kv_heads ({self.kv_heads})")
        _require(self.ff_mult > 0, "model.ff_mult must be positive")
        self.nsa.validate()


@dataclass
class DataConfig:
    # synthetic: in-process pseudo-text, no data needed
    source: Literal["enwik8", "file", "hf", "synthetic", "retrieval"] = "enwik8"
    path: str = ""  # enwik8: where the 100 MB file lives (default data/enwik8); file: any byte file
    hf_name: str = ""  # hf: dataset name for datasets.load_dataset
    hf_config: str = ""  # hf: dataset configuration, if any
    hf_field: str = "text"  # hf: text column, encoded as UTF-8 bytes
    val_frac: float = 0.05  # file / hf sources: fractions split off the end (enwik8: fixed 90/5/5 M)
    test_frac: float = 0.05
    # retrieval (the in-process key-retrieval probe, nsa/retrieval.py): bytes from a key's statement to
    # its query, drawn log-uniformly; keep the maximum below train.seq_len so windows hold whole pairs
    retrieval_min_distance: int = 32
    retrieval_max_distance: int = 4096

    def validate(self):
        _require(self.source != "hf" or self.hf_name, "data.hf_name is required when data.source is 'hf'")
        _require(0 < self.retrieval_min_distance <= self.retrieval_max_distance,
                 "data.retrieval_min_distance must be positive and at most data.retrieval_max_distance")
        _require(0 < self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1,
                 "data.val_frac and data.test_frac must be fractions that leave training data")


@dataclass
class TrainConfig:
    seq_len: int = 512  # context length in bytes
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 10000
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # end of the cosine decay
    warmup_steps: int = 200  # linear warm-up from 0
    weight_decay: float = 0.1  # on matrices only, not on norms, biases or embeddings-like vectors
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    eval_every: int = 500  # steps between validation estimates (0: only at the end)
    eval_batches: int = 20  # micro-batches of the fixed validation slice per estimate
    sample_every: int = 0  # steps between text samples from sample_prompt (0: never)
    sample_prompt: str = "The "
    sample_len: int = 200
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    log_every: int = 10
    max_nonfinite: int = 10  # stop after this many skipped non-finite steps
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile the training model. auto: on CUDA (where it pays for its warm-up), eager on CPU;
    # true also compiles on CPU (works, but the warm-up dwarfs a small run).
    compile: Literal["auto", True, False] = "auto"
    # torch.compile's mode for a compiled CUDA step. reduce-overhead replays the forward and backward as
    # CUDA graphs: no gaps between kernel launches, which pays at short contexts (docs/BENCHMARKS.md);
    # one process and grad_accum 1 only (the graphs' outputs are reused by the next replay).
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    out_dir: str = "runs/default"

    def validate(self):
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "save_every",
                     "log_every", "sample_len", "max_nonfinite"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive")
        for name in ("warmup_steps", "eval_every", "sample_every"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0")
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "train.lr must be positive and train.min_lr in [0, lr]")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _require(self.grad_clip >= 0 and self.weight_decay >= 0, "train.grad_clip and train.weight_decay must be >= 0")
        _require(self.compile_mode == "default" or self.grad_accum == 1,
                 f"train.compile_mode={self.compile_mode} needs train.grad_accum=1 (got {self.grad_accum}): a "
                 "CUDA-graph replay would overwrite the previous micro-batch's gradients")


@dataclass
class LogConfig:
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "nsa"
    run_name: str = ""  # default: the out_dir's name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self):
        self.model.validate()
        self.data.validate()
        self.train.validate()
        return self

    def check_runnable(self, cuda_available):
        """Refuse combinations that would crash at the first forward, backward or sample of a training
        run on this machine (train.device auto means CUDA when `cuda_available`)."""
        n = self.model.nsa
        if self.model.attention != "nsa":
            return self  # the dense model ignores model.nsa
        on_cuda = self.train.device == "cuda" or (self.train.device == "auto" and cuda_available)
        backend = ("triton" if on_cuda else "torch") if n.backend == "auto" else n.backend
        why = f"model.nsa.backend={n.backend}"
        if n.backend == "auto":
            why += f" resolves to {backend} on this machine"
        _require(not (n.diff_topk and backend in ("triton", "flex")),
                 f"model.nsa.diff_topk=true needs the straight-through block gate, which the {backend} selection "
                 f"has not ({why}): use model.nsa.backend=torch, or diff_topk=false")
        _require(n.causal or backend != "triton",
                 f"model.nsa.causal=false: the Triton kernels are causal only ({why}): use model.nsa.backend=torch "
                 "or flex")
        _require(n.backend != "flex" or on_cuda,
                 "model.nsa.backend=flex cannot train on CPU (flex attention has no CPU backward): use "
                 "model.nsa.backend=torch (or auto) on CPU")
        _require(n.causal or not self.train.sample_every,
                 "model.nsa.causal=false cannot sample (decoding is causal): set train.sample_every=0")
        return self


def _require(cond, message):
    if not cond:
        raise ConfigError(message)


def _coerce(value, tp, key):
    """Check (and where lossless, convert) one value against a field type."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not True here
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def from_dict(cls, data, prefix=""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _parse_override(text):
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _set_dotted(tree, key, value):
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key != "<<":
                if key in first:
                    raise ConfigError(f"{self.name}: duplicate key {key!r} on line {line} (first on line {first[key]})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """A config file's tree; one-line ConfigError for a missing file, a directory or a duplicate key."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        return yaml.load(f, Loader=_StrictLoader) or {}


def load_config(path=None, overrides=(), base=None):
    """YAML file (or `base`, a nested dict such as a checkpoint's config) + `a.b=value` overrides
    -> validated Config. (train.py also checks that it can train here: `Config.check_runnable`.)"""
    tree = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        tree = read_yaml(path)
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    # A string override for a str field ("run_name=123") is read by YAML as a number: keep it text.
    return from_dict(Config, _stringify_str_fields(Config, tree)).validate()


def _stringify_str_fields(cls, tree):
    if not isinstance(tree, dict):
        return tree
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in tree.items():
        tp = hints.get(k)
        if tp is not None and dataclasses.is_dataclass(tp):
            out[k] = _stringify_str_fields(tp, v)
        elif tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def to_dict(cfg):
    return dataclasses.asdict(cfg)
