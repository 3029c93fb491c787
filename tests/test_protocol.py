import json

from incdet.config import load_config
from incdet.protocol import method_variants, run_protocol


def test_protocol_shares_step_0_and_skips_completed_steps(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["split=5+5", "memory.budget=4"])
    variants = method_variants(["incdet", "finetune"])
    variants["joint"] = ["incremental.method=joint", "memory.budget=0"]
    res = run_protocol(cfg, tmp_path, variants, progress=False, joint_last_only=True)
    assert [m["step"] for m in res["incdet"]] == [0, 1]
    assert [m["step"] for m in res["joint"]] == [0, 1]
    # step 0 was trained once: the copies hold the very same checkpoint bytes
    a = (tmp_path / "incdet" / "step_0" / "checkpoint.pt").read_bytes()
    assert (tmp_path / "finetune" / "step_0" / "checkpoint.pt").read_bytes() == a
    assert res["finetune"][0] == res["incdet"][0]
    assert res["finetune"][1]["method"] == "finetune" and res["joint"][1]["method"] == "joint"
    mtime = (tmp_path / "finetune" / "step_1" / "metrics.json").stat().st_mtime_ns
    again = run_protocol(cfg, tmp_path, variants, progress=False, joint_last_only=True)
    assert again == res
    assert (tmp_path / "finetune" / "step_1" / "metrics.json").stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "incdet" / "step_1" / "metrics.json").read_text())["memory"]
