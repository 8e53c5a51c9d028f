"""Config loading: YAML + dot overrides, errors that name the key, validation, round trip."""

import re
from pathlib import Path

import pytest
import yaml

from nsa.config import Config, ConfigError, from_dict, load_config, read_yaml, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, tree, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"dim": 128, "nsa": {"window": 64}}, "train": {"lr": "1e-3"}})
    cfg = load_config(path, ["train.max_steps=7", "model.nsa.window=32", "log.run_name=123", "data.source=synthetic"])
    assert cfg.model.dim == 128
    assert cfg.model.nsa.window == 32  # override beats the file
    assert cfg.train.max_steps == 7
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as text: coerced to float
    assert cfg.log.run_name == "123"  # a str field stays a str
    assert cfg.data.source == "synthetic"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.nsa\.windw"):
        load_config(write(tmp_path, {"model": {"nsa": {"windw": 3}}}))
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="bogus"):
        load_config(None, ["bogus.key=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_steps.*expected int"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"train\.compile: 1 is not one of \['auto', True, False\]"):
        load_config(None, ["train.compile=1"])  # 1 == True in Python, but not a bool
    with pytest.raises(ConfigError, match=r"model\.attention"):
        load_config(None, ["model.attention=sparse"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize("overrides, message", [
    (["model.nsa.compress_block=24", "model.nsa.compress_stride=16"],
     "model.nsa.compress_stride (16) must divide model.nsa.compress_block"),
    (["model.nsa.sel_block=40", "model.nsa.compress_stride=16"], "must divide model.nsa.sel_block"),
    (["model.nsa.window=0"], "model.nsa.window must be positive"),
    (["model.nsa.num_mem=-1"], "model.nsa.num_mem must be >= 0"),
    (["model.heads=6", "model.kv_heads=4"], "divisible by model.kv_heads"),
    (["model.nsa.num_selected=3"], "model.nsa.num_selected (3) must exceed the forced blocks"),
    (["train.min_lr=1.0", "train.lr=0.1"], "train.min_lr"),
    (["data.source=hf"], "data.hf_name"),
    (["data.val_frac=0.6", "data.test_frac=0.5"], "leave training data"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.dim=96", "model.nsa.diff_topk=true", "model.nsa.backend=torch", "train.lr=2e-4",
                             "train.compile=false", "data.source=file", "data.path=/x/y"])
    tree = to_dict(cfg)
    assert from_dict(Config, tree) == cfg
    # through YAML, as train.py writes config.yaml
    path = write(tmp_path, tree, "resolved.yaml")
    assert load_config(path) == cfg


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path).check_runnable(path.stem != "smoke")  # on the machine each is written for
    resolved = dict(_leaves(to_dict(cfg)))
    for key, value in _leaves(read_yaml(path)):  # every value the file sets is the one the run gets
        assert resolved[key] == pytest.approx(value) if isinstance(value, float) else resolved[key] == value, key
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should say what it is for in a comment at its top"
    if path.stem.startswith(("enwik8_", "quick_")):  # GPU configs train compiled, by the default
        assert "compile" not in read_yaml(path)["train"] and cfg.train.compile == "auto"


def test_duplicate_key_is_an_error_naming_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("# a config\nmodel: dim 512, a stray sentence\ntrain:\n  lr: 1.0e-3\nmodel:\n  dim: 64\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'model' on line 5 \(first on line 2\)"):
        load_config(path)
    path.write_text("model:\n  nsa:\n    window: 64\n    window: 32\n")
    with pytest.raises(ConfigError, match="duplicate key 'window' on line 4"):
        load_config(path)


def test_config_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_compile_default_auto_and_bools():
    assert load_config(None, []).train.compile == "auto"
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert load_config(None, ["train.compile=false"]).train.compile is False


def test_compile_mode_values_and_grad_accum():
    assert load_config(None, []).train.compile_mode == "default"
    assert load_config(None, ["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"train\.compile_mode: 'max-autotune' is not one of"):
        load_config(None, ["train.compile_mode=max-autotune"])
    with pytest.raises(ConfigError, match="needs train.grad_accum=1"):
        load_config(None, ["train.compile_mode=reduce-overhead", "train.grad_accum=2"])


@pytest.mark.parametrize("overrides, cuda, message", [
    (["model.nsa.diff_topk=true", "model.nsa.backend=triton"], False, "backend=torch"),
    (["model.nsa.diff_topk=true"], True, "model.nsa.backend=auto resolves to triton"),
    (["model.nsa.diff_topk=true", "train.device=cuda"], False, "resolves to triton"),
    (["model.nsa.diff_topk=true", "model.nsa.backend=flex"], True, "flex selection"),
    (["model.nsa.causal=false", "model.nsa.backend=triton"], False, "causal only"),
    (["model.nsa.causal=false"], True, "use model.nsa.backend=torch or flex"),
    (["model.nsa.backend=flex"], False, "flex attention has no CPU backward"),
    (["model.nsa.backend=flex", "train.device=cpu"], True, "cannot train on CPU"),
    (["model.nsa.causal=false", "model.nsa.backend=torch", "train.sample_every=100"], False, "train.sample_every=0"),
])
def test_combinations_that_would_crash_are_refused(overrides, cuda, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides).check_runnable(cuda)


@pytest.mark.parametrize("overrides, cuda", [
    (["model.nsa.diff_topk=true"], False),  # auto on CPU: torch
    (["model.nsa.diff_topk=true", "model.nsa.backend=torch", "train.device=cuda"], True),
    (["model.nsa.causal=false", "model.nsa.backend=flex"], True),
    (["model.nsa.causal=false"], False),
    (["model.attention=dense", "model.nsa.diff_topk=true", "model.nsa.backend=flex"], False),  # nsa block unused
])
def test_combinations_that_run_are_accepted(overrides, cuda):
    load_config(None, overrides).check_runnable(cuda)


def test_shipped_config_pairs_differ_only_in_attention():
    root = Path(__file__).resolve().parents[1] / "configs"
    for nsa_name, dense_name in (("enwik8_nsa", "enwik8_dense"), ("quick_nsa", "quick_dense")):
        a, b = to_dict(load_config(root / f"{nsa_name}.yaml")), to_dict(load_config(root / f"{dense_name}.yaml"))
        assert a["model"]["attention"] == "nsa" and b["model"]["attention"] == "dense"
        a["model"]["attention"] = b["model"]["attention"]
        a["train"]["out_dir"] = b["train"]["out_dir"]
        assert a == b


def test_paper_settings_in_enwik8_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "enwik8_nsa.yaml")
    n = cfg.model.nsa
    assert (n.compress_block, n.compress_stride, n.sel_block, n.num_selected, n.window) == (32, 16, 64, 16, 512)
    assert cfg.train.seq_len == 8192
