import pytest
import yaml

from incdet.base.config import DEFAULTS, dump_config, load_config
from incdet.base.errors import UserError


def test_defaults_and_override(tmp_path):
    cfg = load_config(None, ["train.max_iters=5", "split=[[1, 2], [4]]", "model.head_convs=1"])
    assert cfg["train"]["max_iters"] == 5
    assert cfg["split"] == [[1, 2], [4]]
    assert cfg["model"]["head_convs"] == 1
    assert cfg["train"]["lr"] == DEFAULTS["train"]["lr"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    assert "train.epoch" in str(e.value) and str(path) in str(e.value)


def test_unknown_override_key():
    with pytest.raises(UserError, match="unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_base_inheritance_and_relative_root(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("data:\n  root: mydata\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("_base_: ../base.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config(child)
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["epochs"] == 7
    assert cfg["data"]["root"] == str((tmp_path / "mydata").resolve())


def test_two_levels_of_base_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 1}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    with pytest.raises(UserError, match="one level of _base_"):
        load_config(tmp_path / "c.yaml")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(section)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.seed=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 3
    assert {k: v for k, v in again.items() if k != "_source"} == \
        {k: v for k, v in cfg.items() if k != "_source"}


def test_configuration_reference_is_current_and_complete():
    """docs/configuration.md is generated from DEFAULTS and its comments: it cannot drift."""
    import re

    from incdet.base.config import DEFAULTS, reference_markdown

    from conftest import ROOT

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == reference_markdown(), \
        "docs/configuration.md is stale: python -m incdet.base.config > docs/configuration.md"

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "weights":
                yield from leaves(v, prefix + k + ".")
            else:
                yield prefix + k

    documented = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    assert documented == set(leaves(DEFAULTS))
