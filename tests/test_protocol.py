import json

import pytest
import torch

import incdet.bench.herding
from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.experiment.protocol import method_variants, run_protocol


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
    # the same step 0, declared complete for each variant's own config
    own = {"config_digest", "shared_from"}
    assert {k: v for k, v in res["finetune"][0].items() if k not in own} == \
        {k: v for k, v in res["incdet"][0].items() if k not in own}
    assert res["finetune"][0]["shared_from"] == str(tmp_path / "incdet" / "step_0")
    assert res["finetune"][0]["config_digest"] != res["incdet"][0]["config_digest"]
    assert res["finetune"][1]["method"] == "finetune" and res["joint"][1]["method"] == "joint"
    # joint is the equal-compute upper bound: both steps' budgets (3 + 3 iterations)
    assert res["incdet"][1]["train"]["iterations"] == 3
    assert res["joint"][1]["train"]["iterations"] == 6
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
    for png in ("ap_over_steps.png", "per_class_ap.png", "detections.png"):
        data = (work / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![detections of each method after the last step](detections.png)" in report
    assert f"detections: {work / 'detections.png'}" in out
    from PIL import Image

    with Image.open(work / "detections.png") as img:  # 3 images x 3 methods
        assert img.size[0] > img.size[1] * 0.9
    # the terminal shows the same rows
    assert "final all-classes AP / joint" in out or not final["joint"]
    assert out.count("finetune") >= 2


def test_report_of_a_three_step_protocol_gives_each_steps_course(tiny_config, tmp_path):
    from incdet.experiment.report import write_report

    cfg = load_config(tiny_config, ["train.max_iters=1", "memory.budget=0"])  # "4+3+3"
    res = run_protocol(cfg, tmp_path, method_variants(["finetune"]), progress=False)
    write_report(res, tmp_path, {}, config="tiny", split="4+3+3")
    report = (tmp_path / "report.md").read_text()
    assert ("| method | seeds | after step 0 | after step 1 | after step 2 | each class when "
            "learned | forgetting of step 0 | forgetting of step 1 |") in report
    aps = [f"{m['map']['all']['AP']:.3f}" for m in res["finetune"]]
    # 4 + 3 + 3 classes: each group's AP at its own step, weighted by its classes
    learned = sum(n * m["map"]["new"]["AP"] for n, m in zip((4, 3, 3), res["finetune"])) / 10
    forgot = [f"{res['finetune'][2]['forgetting'][f'step_{g}']:.3f}" for g in (0, 1)]
    assert "| finetune | 1 | " + " | ".join(aps + [f"{learned:.3f}"] + forgot) + " |" in report


def test_joint_reference_is_used_only_when_trained_the_same_way(tmp_path):
    import pytest

    from incdet.base.config import dump_config
    from incdet.base.errors import UserError
    from incdet.bench.accuracy import read_joint_reference, with_joint_reference

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
    # the equal-compute rule: the reference trained both steps' budgets (2 x 40), whatever its
    # train.max_iters says; one step's budget is refused
    (ref / "metrics.json").write_text(json.dumps(dict(metrics, train={"iterations": 80})))
    assert read_joint_reference(ref / "metrics.json", cfg, [1, 2, 3, 4], iterations=80) == 0.4
    with pytest.raises(UserError, match="80 iterations \\(the equal-compute joint needs 160"):
        read_joint_reference(ref / "metrics.json", cfg, [1, 2, 3, 4], iterations=160)
    # a per-class budget (20 x 4 classes) and another thread count describe the same reference
    per_class = load_config(None, ["split=2+2", "train.iters_per_class=20", "train.threads=1"])
    assert read_joint_reference(ref / "metrics.json", per_class, [1, 2, 3, 4],
                                iterations=80) == 0.4


def test_joint_budget_rule(tiny_config):
    import pytest

    from incdet.base.errors import UserError
    from incdet.experiment.loaders import load_experiment
    from incdet.experiment.methods import training_budget

    cfg = load_config(tiny_config, ["incremental.method=joint", "train.max_iters=10"])
    _, _, classes = load_experiment(cfg, progress=False)
    assert [training_budget(cfg, classes, [], t, 5) for t in range(3)] == [10, 20, 30]
    cfg["incremental"]["joint_budget"] = "step"
    assert training_budget(cfg, classes, [], 2, 5) == 10
    cfg["incremental"]["method"] = "incdet"
    cfg["incremental"]["joint_budget"] = "equal"
    assert training_budget(cfg, classes, [], 2, 5) == 10
    cfg["incremental"]["joint_budget"] = "twice"
    with pytest.raises(UserError, match="incremental.joint_budget: 'twice' is not one of"):
        training_budget(cfg, classes, [], 1, 5)


def test_iters_per_class_budget(tiny_config):
    """A step's budget scales with the classes it adds ("4+3+3"); the equal-compute joint
    trains the sum, which is iters_per_class times every seen class."""
    import pytest

    from incdet.base.errors import UserError
    from incdet.experiment.loaders import load_experiment
    from incdet.experiment.methods import incremental_iterations, training_budget

    cfg = load_config(tiny_config, ["train.iters_per_class=5"])  # overrides max_iters: 3
    _, _, classes = load_experiment(cfg, progress=False)
    assert [training_budget(cfg, classes, [], t, 7) for t in range(3)] == [20, 15, 15]
    assert incremental_iterations(cfg, classes, [], 2) == 50
    cfg["incremental"]["method"] = "joint"
    assert [training_budget(cfg, classes, [], t, 7) for t in range(3)] == [20, 35, 50]
    cfg["incremental"]["joint_budget"] = "step"
    assert training_budget(cfg, classes, [], 2, 7) == 15
    for bad in (0, 2.5, True):
        cfg["train"]["iters_per_class"] = bad
        with pytest.raises(UserError, match="train.iters_per_class: .* is not a positive integer"):
            training_budget(cfg, classes, [], 0, 7)


def test_benchmark_refuses_joint_reference_beside_joint(tmp_path, capsys):
    import importlib.util

    import pytest

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main(["--sections", "2step", "--methods", "incdet,joint@train.lr=0.01",
                   "--joint-reference", str(tmp_path / "metrics.json"), "--work-dir",
                   str(tmp_path)])
    assert e.value.code == 2
    assert "--joint-reference replaces training joint" in capsys.readouterr().err
    assert not (tmp_path / "benchmark.json").exists()


def test_benchmark_keeps_sections_written_meanwhile(tmp_path, monkeypatch, capsys):
    """Two benchmark runs sharing --work-dir (say 4step and 6step in parallel) keep each other's
    sections: a run merges its section into the file as it is when it writes."""
    import importlib.util

    import pytest

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bm"
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"results": {"4step": {"old": 1}}}))

    def herding_time(sizes):  # another run finishes its section while this one works
        (out / "benchmark.json").write_text(json.dumps(
            {"results": {"4step": {"old": 1}, "6step": {"final_ap": {"incdet": 0.5}}}}))
        return {n: {"seconds": 1.0 + n / 1000, "pairs": n} for n in sizes}

    monkeypatch.setattr(incdet.bench.herding, "herding_time", herding_time)
    assert tool.main(["--sections", "herding", "--quick", "--work-dir", str(out)]) == 0
    results = json.loads((out / "benchmark.json").read_text())["results"]
    assert results["6step"] == {"final_ap": {"incdet": 0.5}} and results["4step"] == {"old": 1}
    assert results["herding"]["ratio_4n_to_n"] == pytest.approx(5.0 / 2.0)
    with pytest.raises(SystemExit):
        tool.main(["--sections", "6step", "--iters-per-class", "0", "--work-dir", str(out)])
    assert "--iters-per-class 0: expected a positive integer" in capsys.readouterr().err


def test_steps_table_gives_ap_after_each_step_and_forgetting_per_group():
    from incdet.bench.accuracy import over_seeds
    from incdet.bench.markdown import markdown
    from incdet.experiment.report import steps_table

    def steps(aps, forgetting, new=(None, None, None)):  # a benchmark's condensed steps
        return [{"step": t, "map": {"all": ap, "new": n}, "new_classes": (2, 1, 1)[t],
                 "forgetting": forgetting if t == len(aps) - 1 else {}}
                for t, (ap, n) in enumerate(zip(aps, new))]

    per = {"incdet": [steps([0.5, 0.4, 0.3], {"step_0": 0.1, "step_1": 0.2}, (0.5, 0.6, 0.2)),
                      steps([0.7, 0.6, 0.5], {"step_0": 0.3, "step_1": None}, (0.7, 0.4, 0.6))],
           "joint": [[{"step": 2, "map": {"all": 0.6}, "forgetting": {}}]]}
    lines = steps_table("6step: ", per)
    assert lines[0].startswith("6step: AP over all seen classes after each step")
    assert lines[2] == ("| method | seeds | after step 0 | after step 1 | after step 2 | "
                        "each class when learned | forgetting of step 0 | forgetting of step 1 |")
    # when learned: (2 x 0.5 + 0.6 + 0.2) / 4 = 0.45 and (2 x 0.7 + 0.4 + 0.6) / 4 = 0.6
    assert lines[4] == ("| incdet | 2 | 0.600 (0.500–0.700) | 0.500 (0.400–0.600) | "
                        "0.400 (0.300–0.500) | 0.525 (0.450–0.600) | 0.200 (0.100–0.300) | "
                        "0.200 |")
    assert len(lines) == 5  # joint (one step) has no course
    # the full metrics of a protocol report (map values with AP, the classes themselves) give
    # the same cells
    full = {"incdet": [[{"step": s["step"], "forgetting": s["forgetting"],
                         "classes": {"new": list(range(s["new_classes"]))},
                         "map": {k: {"AP": v} for k, v in s["map"].items()}}
                        for s in per["incdet"][0]]]}
    assert steps_table("", full)[4] == \
        "| incdet | 1 | 0.500 | 0.400 | 0.300 | 0.450 | 0.100 | 0.200 |"
    # a summary without the groups' APs (written before 2026-12-01) has no "when learned"
    old = [[dict(s, map={"all": s["map"]["all"]}) for s in per["incdet"][0]]]
    assert steps_table("", {"incdet": old})[4] == \
        "| incdet | 1 | 0.500 | 0.400 | 0.300 | – | 0.100 | 0.200 |"
    # the benchmark's markdown puts it after the figures of a long protocol
    r = over_seeds({0: {"final_ap": {"incdet": 0.3}, "step0_retention": {"incdet": 0.6},
                        "steps": {"incdet": per["incdet"][0]}}})
    text = markdown({"results": {"6step": dict(r, iters_per_class=290,
                                               variants={"incdet": []})}})
    assert "equal compute: 290 iterations per class a step adds together" in text
    assert text.endswith("| incdet | 1 | 0.500 | 0.400 | 0.300 | 0.450 | 0.100 | 0.200 |")


def test_seeds_are_summarised_with_mean_and_spread():
    from incdet.bench.accuracy import over_seeds, spread_text
    from incdet.bench.markdown import markdown

    runs = {0: {"final_ap": {"incdet": 0.50, "joint": 0.60}, "step0_retention": {"incdet": 0.9},
                "ratio_to_joint": {"incdet": 0.50 / 0.60, "joint": 1.0}},
            1: {"final_ap": {"incdet": 0.54, "joint": 0.60}, "step0_retention": {"incdet": None},
                "ratio_to_joint": {"incdet": 0.90, "joint": 1.0}}}
    r = over_seeds(runs)
    assert list(r["final_ap"]) == ["incdet", "joint"]
    inc = r["final_ap"]["incdet"]
    assert inc["n"] == 2 and inc["min"] == 0.50 and inc["max"] == 0.54
    assert abs(inc["mean"] - 0.52) < 1e-12
    assert r["step0_retention"]["incdet"] == {"mean": 0.9, "min": 0.9, "max": 0.9, "n": 1}
    assert r["seeds"]["1"] is runs[1]
    assert spread_text(inc) == "0.520 (0.500–0.540, 2 seeds)"
    assert spread_text(r["step0_retention"]["incdet"], ".2f") == "0.90 (1 seed)"
    table = markdown({"results": {"2step": dict(r, iters_per_step=100,
                                                variants={"incdet": [], "joint": []})}})
    assert "| 2step: incdet AP, and / joint | 0.520 (0.500–0.540, 2 seeds); " in table
    assert "equal compute" in table and "≥ 0.95" in table


def test_a_step_can_record_its_ap_curve(tiny_config, tmp_path):
    import pytest

    from incdet.base.errors import UserError
    from incdet.experiment.step import run_step

    cfg = load_config(tiny_config, ["train.max_iters=4", "train.checkpoint_every=2",
                                    "eval.every_iters=2", "split=10"])
    m = run_step(cfg, 0, tmp_path / "a", progress=False)
    assert [c["iteration"] for c in m["curve"]] == [2, 4]
    assert m["curve"][-1]["AP"] == m["map"]["all"]["AP"]
    assert all(c["AP"] is not None for c in m["curve"])
    plain = run_step(load_config(tiny_config, ["train.max_iters=4", "train.checkpoint_every=2",
                                               "split=10"]), 0, tmp_path / "b", progress=False)
    assert "curve" not in plain
    # evaluating midway does not change the training: same final AP
    assert plain["map"]["all"] == m["map"]["all"]
    bad = load_config(tiny_config, ["train.checkpoint_every=3", "eval.every_iters=2"])
    with pytest.raises(UserError, match="eval.every_iters: 2 must be a multiple of "
                                        "train.checkpoint_every"):
        run_step(bad, 0, tmp_path / "c", progress=False)


def test_table_shows_no_training_time_for_an_imported_step_0():
    from incdet.experiment.report import table

    def step(t, seconds, iterations, ips):
        return {"step": t, "map": {g: {"AP": 0.5, "AP50": 0.6, "AP75": 0.4}
                                   for g in ("old", "new", "all")},
                "forgetting": {}, "train": {"seconds": seconds, "iterations": iterations,
                                            "images_per_second": ips}}

    text = table({"methods": {"incdet": [step(0, 0.0, 0, 0.0), step(1, 590.4, 300, 9.14)]}})
    rows = [line.split() for line in text.splitlines()[1:3]]
    assert rows[0][-2:] == ["–", "–"]  # imported: nothing trained, no 0 s or 0.0 img/s
    assert rows[1][-2:] == ["590", "9.1"]
    assert text.splitlines()[-1].startswith("no ratio to joint: joint (the upper bound")


def test_model_cost_times_every_variant_side_by_side(tiny_config):
    """The gpu section's measurement, run on CPU: every variant in each precision, medians,
    images/s and the speed-up over torchvision's v2, consistent with each other."""
    from incdet.base.config import load_config
    from incdet.bench.model_cost import model_cost

    r = model_cost(load_config(tiny_config), "cpu", ("fp32",), iters=1, batch_size=2)
    names = {"incdet_step0", "incdet_step1", "branch", "tv_v1", "tv_v2"}
    assert r["device"] == "cpu" and r["batch_size"] == 2
    assert r["image_size"] == {"min_size": 64, "max_size": 64}
    for precision in ("fp32",):  # bf16 takes the same path under autocast (slow on CPU)
        seconds = r["seconds"][precision]
        assert set(seconds) == names and all(s > 0 for s in seconds.values())
        for n in names:
            assert r["images_per_second"][precision][n] == pytest.approx(2 / seconds[n])
            assert r["speedup_over_tv_v2"][precision][n] == pytest.approx(
                seconds["tv_v2"] / seconds[n])
        assert r["speedup_over_tv_v2"][precision]["tv_v2"] == 1.0
    assert "peak_gpu_memory_gib" not in r
    with pytest.raises(UserError, match="precision 'fp8'"):
        model_cost(load_config(tiny_config), "cpu", ("fp8",), iters=1, batch_size=2)


def test_training_throughput_runs_the_loop_on_the_given_device(tiny_config):
    from incdet.bench.training_cost import training_throughput

    r = training_throughput(load_config(tiny_config), iters=2, device="cpu")
    assert r["device"] == "cpu" and r["batch_size"] == 4 and r["iters"] == 2
    assert r["images_per_second"] > 0
    if not torch.cuda.is_available():  # a device that is not here: one clear error
        with pytest.raises(UserError, match="CUDA is not available"):
            training_throughput(load_config(tiny_config), iters=2, device="cuda")
