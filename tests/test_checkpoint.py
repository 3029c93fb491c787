import copy
import os
import pickle

import pytest
import torch

from incdet.base.errors import UserError
from incdet.model.checkpoint import check_compatible, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this runs code (creates a marker file): a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        torch.save({"format": "incdet", "model": _Payload(marker)}, f)
    with pytest.raises(UserError, match="refused to load: the file is not a data-only checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    # a plain pickle file is refused too
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError):
        load_checkpoint(raw)
    assert not os.path.exists(marker)


def test_round_trip_and_compatibility_checks(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1, "class_order": [3, 1, 2], "steps": [[3, 1], [2]],
                           "model": {"w": torch.ones(2)}, "config": {"a": None}})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "incdet" and torch.equal(ckpt["model"]["w"], torch.ones(2))
    check_compatible(ckpt, path, [3, 1, 2], [[3, 1], [2]], 1)
    with pytest.raises(UserError, match="of step 1, expected step 0"):
        check_compatible(ckpt, path, [3, 1, 2], [[3, 1], [2]], 0)
    with pytest.raises(UserError, match="another class order or split"):
        check_compatible(ckpt, path, [1, 3, 2], [[1, 3], [2]], 1)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "junk.pt")


def test_config_saved_before_reduced_tail_existed_rebuilds_the_full_tail():
    from incdet.base.config import DEFAULTS, with_defaults
    from incdet.model.builder import build_model
    from incdet.model.checkpoint import model_from_checkpoint

    saved = copy.deepcopy(DEFAULTS)
    saved["model"].update(fpn_channels=16, head_convs=1, min_size=64, max_size=64)
    del saved["model"]["reduced_tail"]  # as written by a version without the key
    old = build_model(dict(saved["model"], reduced_tail=False), [2])
    ckpt = {"config": saved, "head_layout": [2], "model": old.state_dict()}
    model = model_from_checkpoint(ckpt)  # loads: the full tail, not today's default
    assert list(model.backbone.body.values())[-1].out_channels == 960
    assert with_defaults({"model": {"reduced_tail": True}})["model"]["reduced_tail"] is True
    assert with_defaults({})["model"]["reduced_tail"] is True  # no model section: today's default
    assert "reduced_tail" not in saved["model"]  # the saved config is not modified
    # today's config on that checkpoint (the reduced tail): one message naming the key and the fix
    today = with_defaults(dict(saved, model=dict(saved["model"], reduced_tail=True)))
    with pytest.raises(UserError) as err:
        model_from_checkpoint(ckpt, today, "runs/x/step_0/checkpoint.pt")
    msg = str(err.value)
    assert msg.startswith("runs/x/step_0/checkpoint.pt: the checkpoint's weights do not fit")
    assert "model.reduced_tail: true here, false in the checkpoint" in msg
    assert "--set model.KEY=VALUE" in msg and "fpn_channels" not in msg


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's 0600: a results file another user (or a web server) reads is readable."""
    import os

    from incdet.base.io import atomic_torch_save, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        atomic_torch_save(tmp_path / "c.pt", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
