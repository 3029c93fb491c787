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


def test_run_protocol_tool_writes_report_plots_and_shares_step_0(tiny_config, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_protocol", "tools/run_protocol.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    work = tmp_path / "w"
    # finetune first: it trains step 0 without a memory, so incdet must select its own from the
    # shared model
    rc = tool.main(["--config", str(tiny_config), "--work-dir", str(work), "--methods",
                    "finetune,incdet,joint", "--set", "split=5+5", "--set", "memory.budget=4",
                    "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert list(summary["methods"]) == ["finetune", "incdet", "joint"]
    assert [m["step"] for m in summary["methods"]["joint"]] == [0, 1]
    assert (work / "finetune" / "step_0" / "checkpoint.pt").read_bytes() == \
        (work / "incdet" / "step_0" / "checkpoint.pt").read_bytes()
    assert not (work / "finetune" / "step_0" / "memory.json").exists()
    assert (work / "incdet" / "step_0" / "memory.json").is_file()
    assert json.loads((work / "incdet" / "step_1" / "metrics.json").read_text())["memory"][
        "replayed_from_previous"] > 0
    final = {m: s[-1]["map"]["all"]["AP"] for m, s in summary["methods"].items()}
    assert summary["final_ap"] == final
    if final["joint"]:
        assert summary["ratio_to_joint"]["incdet"] == final["incdet"] / final["joint"]
    report = (work / "report.md").read_text()
    assert report.count("| incdet | ") == 2 and "ap_over_steps.png" in report
    ft1 = summary["methods"]["finetune"][1]
    assert f"| finetune | 1 | {ft1['map']['old']['AP']:.3f} |" in report
    for png in ("ap_over_steps.png", "per_class_ap.png"):
        data = (work / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # the terminal shows the same rows
    assert "final all-classes AP / joint" in out or not final["joint"]
    assert out.count("finetune") >= 2


def test_joint_reference_is_used_only_when_trained_the_same_way(tmp_path):
    import pytest

    from incdet.benchmarks import read_joint_reference, with_joint_reference
    from incdet.config import dump_config
    from incdet.errors import UserError

    cfg = load_config(None, ["split=2+2", "train.max_iters=40"])
    ref = tmp_path / "joint" / "step_0"
    ref.mkdir(parents=True)
    dump_config(load_config(None, ["split=4", "train.max_iters=40"]), ref / "config.yaml")
    metrics = {"classes": {"old": [], "new": [1, 2, 3, 4]}, "map": {"all": {"AP": 0.4}}}
    (ref / "metrics.json").write_text(json.dumps(metrics))
    result = {"final_ap": {"incdet": 0.3, "finetune": 0.1}}
    joint_ap = read_joint_reference(ref / "metrics.json", cfg, [1, 2, 3, 4])
    assert joint_ap == 0.4
    out = with_joint_reference(result, joint_ap, ref / "metrics.json")
    assert out["joint_reference"] == str(ref / "metrics.json")
    assert out["final_ap"]["joint"] == 0.4
    assert out["ratio_to_joint"] == {"incdet": pytest.approx(0.75), "finetune": pytest.approx(0.25),
                                     "joint": 1.0}
    assert result["final_ap"] == {"incdet": 0.3, "finetune": 0.1}  # the input is not modified
    other = load_config(None, ["split=2+2", "train.max_iters=40", "train.lr=0.01",
                               "model.fpn_channels=32"])
    with pytest.raises(UserError, match=r"differently .*model\.fpn_channels, train\.lr"):
        read_joint_reference(ref / "metrics.json", other, [1, 2, 3, 4])
    quick = load_config(None, ["split=2+2", "train.max_iters=40", "data.val_max_images=100"])
    with pytest.raises(UserError, match=r"differently .*: data\.val_max_images$"):
        read_joint_reference(ref / "metrics.json", quick, [1, 2, 3, 4])
    moved = load_config(None, ["split=2+2", "train.max_iters=40", f"data.root={tmp_path}"])
    assert read_joint_reference(ref / "metrics.json", moved, [1, 2, 3, 4]) == 0.4
    with pytest.raises(UserError, match=r"classes \(4 of 5\)"):
        read_joint_reference(ref / "metrics.json", cfg, [1, 2, 3, 4, 5])
    with pytest.raises(UserError, match="must be the metrics.json of a finished step-0 run"):
        read_joint_reference(tmp_path / "missing" / "metrics.json", cfg, [1, 2, 3, 4])


def test_benchmark_refuses_joint_reference_beside_joint(tmp_path, capsys):
    import importlib.util

    import pytest

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main(["--sections", "2step", "--methods", "incdet,joint@train.lr=0.01",
                   "--joint-reference", str(tmp_path / "metrics.json"), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--joint-reference replaces training joint" in capsys.readouterr().err
    assert not (tmp_path / "benchmark.json").exists()
