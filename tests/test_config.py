"""Config loading: YAML + dot overrides, errors that name the key, validation, round trip."""

from pathlib import Path

import pytest
import yaml

from nsa.config import Config, ConfigError, from_dict, load_config, to_dict

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
    with pytest.raises(ConfigError, match=r"train\.compile.*expected bool"):
        load_config(None, ["train.compile=3"])
    with pytest.raises(ConfigError, match=r"model\.attention"):
        load_config(None, ["model.attention=sparse"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


@pytest.mark.parametrize("overrides, message", [
    (["model.nsa.compress_block=24", "model.nsa.compress_stride=16"], "must divide nsa.compress_block"),
    (["model.nsa.sel_block=40", "model.nsa.compress_stride=16"], "must divide nsa.sel_block"),
    (["model.heads=6", "model.kv_heads=4"], "divisible by model.kv_heads"),
    (["model.nsa.num_selected=3"], "must exceed the forced blocks"),
    (["train.min_lr=1.0", "train.lr=0.1"], "train.min_lr"),
    (["data.source=hf"], "data.hf_name"),
    (["data.val_frac=0.6", "data.test_frac=0.5"], "leave training data"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, overrides)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.dim=96", "model.nsa.diff_topk=true", "train.lr=2e-4", "data.source=file",
                             "data.path=/x/y"])
    tree = to_dict(cfg)
    assert from_dict(Config, tree) == cfg
    # through YAML, as train.py writes config.yaml
    path = write(tmp_path, tree, "resolved.yaml")
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert to_dict(load_config(None, [])).keys() == to_dict(cfg).keys()
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should say what it is for in a comment at its top"


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
