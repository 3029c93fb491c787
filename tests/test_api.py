"""The public Python API (incdet.__all__): every name exists and is documented, and configs are
taken as paths or dicts with --set-style overrides. docs/tutorial.md (tests/test_tutorial.py)
runs the journey through it."""
import inspect

import pytest

import incdet
from incdet.base.errors import UserError


def test_every_public_name_exists_and_says_what_it_does():
    assert {"import_detector", "run_step", "run_protocol", "evaluate", "merge", "export",
            "load_detector", "Detector"} <= set(incdet.__all__)
    for name in incdet.__all__:
        obj = getattr(incdet, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"incdet.{name} has no docstring"


def test_a_config_is_a_path_or_a_dict_and_overrides_apply_to_a_copy(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_iters: 7}\n")
    cfg = incdet.load_config(path, ["train.lr=0.01"])
    assert cfg["train"]["max_iters"] == 7 and cfg["train"]["lr"] == 0.01
    again = incdet.load_config(cfg, ["train.max_iters=3"])
    assert again["train"]["max_iters"] == 3 and cfg["train"]["max_iters"] == 7
    with pytest.raises(UserError, match="unknown config key 'train.lrr'"):
        incdet.load_config(cfg, ["train.lrr=1"])


def test_unknown_methods_are_one_error_naming_the_choices(tmp_path):
    with pytest.raises(UserError, match="--methods: incdet_memoryy not among incdet, "):
        incdet.run_protocol(None, tmp_path / "w", methods=["incdet_memoryy"])
    assert not (tmp_path / "w").exists()
