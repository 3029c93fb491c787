"""The host-cost measurement: its parts add up, and what the device would wait for is counted."""
import pytest

from incdet.base.config import load_config
from incdet.bench.hostcost import host_cost


def test_parts_add_up_and_the_loop_synchronises_once_per_iteration(tiny_config):
    cfg = load_config(tiny_config, ["model.fpn_channels=8"])
    out = host_cost(cfg, iters=2, warmup=1, batch_size=4)
    parts = ("transform", "anchors", "loss", "optimizer", "rest")
    assert out["batch_size"] == 4 and out["threads"] == 1
    assert all(out[k] > 0 for k in ("iteration", "model_forward", "backward", *parts))
    for k in ("host", "model_forward", "backward"):
        assert out[k] < out["iteration"]
    assert out["host_share"] == pytest.approx(out["host"] / out["iteration"])
    # the medians of each part are taken separately: their sum is close to, not equal to, host
    assert sum(out[k] for k in parts) == pytest.approx(out["host"], rel=0.5)
    # no loss term is read back per iteration: only the finiteness check synchronises
    assert out["syncs"]["loop"] == 1
    # in the loss: the foreground anchors of the box loss and the distilled anchors, once each
    assert out["syncs"]["loss"] == 2
    assert out["ops"]["loss"] > 0 and out["ops"]["model_forward"] > 0
    # the allocator follows train.keep_freed_memory, as training does; page faults are counted
    assert out["keep_freed_memory"] is False  # off by default
    assert isinstance(out["page_faults"], int) and out["page_faults"] >= 0
