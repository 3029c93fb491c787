"""One command line across the tools (incdet/tools/cli.py): every option explained, the former
spellings still working with a deprecation line, --device reaching the config, one set of image
suffixes, one vocabulary of methods."""
import argparse
import importlib
import json
import pkgutil

import pytest
import torch
from PIL import Image

import incdet.bench.herding
import incdet.tools
from incdet.base.errors import UserError
from incdet.base.io import IMAGE_SUFFIXES, image_files
from incdet.experiment.merge import image_folder
from incdet.experiment.protocol import VARIANTS, method_variants
from incdet.tools.cli import main_guard

from conftest import ROOT

TOOLS = sorted(m.name for m in pkgutil.iter_modules(incdet.tools.__path__) if m.name != "cli")


class _Parsed(Exception):
    """Raised in place of running a tool, once its arguments are parsed."""

    def __init__(self, parser, namespace):
        super().__init__()
        self.parser, self.namespace = parser, namespace


@pytest.fixture
def parsed(monkeypatch):
    """``parsed(tool, argv)``: the tool's parser and its parsed arguments, nothing run."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(self, real(self, args, namespace))

    def run(tool: str, argv: list[str]):
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
        try:
            with pytest.raises(_Parsed) as e:
                importlib.import_module(f"incdet.tools.{tool}").main(argv)
        finally:
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
        return e.value.parser, e.value.namespace

    return run


def _help_parser(tool: str, monkeypatch) -> argparse.ArgumentParser:
    def stop(self, args=None, namespace=None):
        raise _Parsed(self, None)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed) as e:
        importlib.import_module(f"incdet.tools.{tool}").main([])
    return e.value.parser


def test_the_tools_are_all_found():
    assert {"train_step", "run_protocol", "import_detector", "merge", "benchmark", "evaluate",
            "infer", "export", "summarize", "make_dataset", "hostcost",
            "fetch_weights"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_a_help_text(tool, monkeypatch, capsys):
    parser = _help_parser(tool, monkeypatch)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"tools/{tool}.py {name}: no help text"
    # and --help prints them, exit 0
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"incdet.tools.{tool}").main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for choice in action.choices or ():
            assert str(choice) in text, f"tools/{tool}.py --help does not list {choice}"


@pytest.mark.parametrize("tool", ["train_step", "run_protocol", "import_detector", "merge",
                                  "benchmark", "evaluate", "infer", "export"])
def test_every_tool_that_computes_takes_device_with_its_choices(tool, monkeypatch):
    parser = _help_parser(tool, monkeypatch)
    device = next(a for a in parser._actions if "--device" in a.option_strings)
    assert "auto" in device.help and "cpu" in device.help and "cuda:N" in device.help


def test_the_former_spellings_work_and_say_so(parsed, capsys):
    cases = [("infer", ["--checkpoint", "c.pt", "--images", "a.png", "--out", "o"], "out_dir",
              "--out", "--out-dir"),
             ("make_dataset", ["--out", "d"], "out_dir", "--out", "--out-dir"),
             ("evaluate", ["--checkpoint", "c.pt", "--json", "e.json"], "out", "--json",
              "--out"),
             ("benchmark", ["--out", "b"], "work_dir", "--out", "--work-dir")]
    for tool, argv, dest, old, new in cases:
        _, args = parsed(tool, argv)
        assert getattr(args, dest) == argv[argv.index(old) + 1]
        err = capsys.readouterr().err
        assert f"warning: {old} is deprecated and will be removed in the next release; use " \
               f"{new}" in err, tool
        # the current spelling says nothing
        _, args = parsed(tool, [new if a == old else a for a in argv])
        assert getattr(args, dest) == argv[argv.index(old) + 1]
        assert "deprecated" not in capsys.readouterr().err


def test_make_dataset_writes_where_the_former_out_says(tmp_path, capsys):
    from incdet.tools.make_dataset import main

    assert main(["--out", str(tmp_path / "d"), "--coco-like", "--train", "20"]) == 0
    assert (tmp_path / "d" / "annotations" / "instances_train2017.json").is_file()
    assert "--out is deprecated" in capsys.readouterr().err


def test_summarize_takes_work_dir_and_still_the_positional_folder(tmp_path, capsys):
    from incdet.tools.summarize import main

    empty = str(tmp_path)
    assert main_guard(lambda: main(["--work-dir", empty])) == 2
    err = capsys.readouterr().err
    assert f"error: {empty}: no completed step" in err and "deprecated" not in err
    assert main_guard(lambda: main([empty])) == 2
    err = capsys.readouterr().err
    assert "warning: the positional WORK_DIR is deprecated" in err and "use --work-dir" in err
    assert f"error: {empty}: no completed step" in err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "--work-dir" in capsys.readouterr().err


def test_benchmark_work_dir_and_its_former_out(tmp_path, monkeypatch, capsys):
    from incdet.tools.benchmark import main

    monkeypatch.setattr(incdet.bench.herding, "herding_time",
                        lambda sizes: {n: {"seconds": 1.0 + n, "pairs": n} for n in sizes})
    for flag, folder in (("--work-dir", tmp_path / "a"), ("--out", tmp_path / "b")):
        assert main(["--sections", "herding", "--quick", flag, str(folder)]) == 0
        assert "herding" in json.loads((folder / "benchmark.json").read_text())["results"]
    assert "--out is deprecated" in capsys.readouterr().err


def test_device_reaches_the_config_of_every_training_tool(tiny_config, tmp_path, monkeypatch):
    from incdet.experiment import importer
    from incdet.model import torchvision as tv
    from incdet.tools import import_detector, merge, run_protocol, train_step

    seen = {}

    def keep(name):
        def fn(*args, **kwargs):
            cfg = next(a for a in args if isinstance(a, dict) and "train" in a)
            seen[name] = cfg["train"]["device"]
            raise UserError("stop")
        return fn

    monkeypatch.setattr(train_step, "run_step", keep("train_step"))
    monkeypatch.setattr(run_protocol, "run_protocol", keep("run_protocol"))
    monkeypatch.setattr(merge, "merge", keep("merge"))
    monkeypatch.setattr(importer, "import_detector", keep("import_detector"))
    monkeypatch.setattr(tv, "torchvision_from_weights", lambda name: (None, [], None))
    work = str(tmp_path / "w")
    common = ["--config", str(tiny_config), "--device", "cpu", "--set", "train.device=auto"]
    calls = {"train_step": (train_step, ["--step", "0", "--work-dir", work]),
             "run_protocol": (run_protocol, ["--work-dir", work]),
             "merge": (merge, ["--teacher", "t", "--work-dir", work]),
             "import_detector": (import_detector, ["--weights", "W", "--work-dir", work])}
    for name, (tool, argv) in calls.items():
        assert main_guard(lambda: tool.main(argv + common)) == 2  # the "stop" above
    assert seen == dict.fromkeys(calls, "cpu")  # --device wins over --set train.device
    # without --device: the config's
    assert main_guard(lambda: train_step.main(["--step", "0", "--work-dir", work, "--config",
                                               str(tiny_config)])) == 2
    assert seen["train_step"] == "auto"


def test_device_is_checked_by_its_spelling_and_where_cuda_is_missing(
        tiny_config, tmp_path, capsys):
    from incdet.tools import train_step

    argv = ["--config", str(tiny_config), "--step", "0", "--work-dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as e:
        train_step.main(argv + ["--device", "gpu"])
    assert e.value.code == 2
    assert "'gpu' is not one of auto (CUDA when available, else CPU), cpu, cuda or cuda:N" in \
        capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main_guard(lambda: train_step.main(argv + ["--device", "cuda:0"])) == 2
        assert "error: --device: 'cuda:0' requested but CUDA is not available" in \
            capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def test_benchmark_device_sets_the_sections_config_and_the_throughput(monkeypatch):
    from incdet.bench import training_cost
    from incdet.tools.benchmark import main

    seen = {}

    def throughput(cfg, iters, device):
        seen.update(config=cfg["train"]["device"], device=device)
        raise UserError("stop")

    monkeypatch.setattr(training_cost, "training_throughput", throughput)
    assert main_guard(lambda: main(["--sections", "throughput", "--device", "cpu"])) == 2
    assert seen == {"config": "cpu", "device": "cpu"}


def test_image_files_one_set_of_suffixes_for_files_and_folders(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["a.png", "b.JPG", "c.jpeg", "d.bmp", "e.webp", "f.tif", "g.TIFF"]
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP",
               ".tif": "TIFF", ".tiff": "TIFF"}
    for i, name in enumerate(names):
        Image.new("RGB", (8 + i, 6)).save(folder / name, formats["." + name.split(".")[1].lower()])
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder, whatever its name
    assert {n.split(".")[1].lower() for n in names} == {s[1:] for s in IMAGE_SUFFIXES}
    single = tmp_path / "single.png"
    Image.new("RGB", (5, 5)).save(single)
    assert image_files([folder, single]) == [folder / n for n in names] + [single]
    # merge's transfer folder reads the same images
    records = image_folder(folder)
    assert [r.path for r in records] == [str(folder / n) for n in names]
    assert [r.width for r in records] == [8 + i for i in range(len(names))]
    with pytest.raises(UserError, match=r"--images .*missing: no such image file or folder"):
        image_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no image found \(looked for \.png, \.jpg"):
        image_files([tmp_path / "empty"])


def test_one_vocabulary_of_methods():
    assert list(VARIANTS) == ["incdet", "finetune", "joint", "branch", "incdet_no_memory",
                              "incdet_pseudo"]
    v = method_variants(["incdet", "incdet_no_memory", "incdet_pseudo"])
    assert v == {"incdet": ["incremental.method=incdet"],
                 "incdet_no_memory": ["incremental.method=incdet", "memory.budget=0"],
                 "incdet_pseudo": ["incremental.method=incdet", "memory.budget=0",
                                   "incremental.pseudo_labels=true"]}
    with pytest.raises(UserError, match="--methods: incdet_memory not among incdet, finetune"):
        method_variants(["incdet", "incdet_memory"])


def test_benchmark_names_its_variants_as_run_protocol_does(
        tmp_path, monkeypatch, capsys, parsed):
    """incdet is the config's memory, incdet_no_memory none; the former incdet_memory still
    means incdet; folders and result keys carry the names, and the result records them."""
    from incdet.bench import accuracy
    from incdet.tools.benchmark import main

    seen = {}

    def run(cfg, folder, variants, progress):
        seen.update(folder=folder, variants=variants)
        return {"final_ap": {m: 0.5 for m in variants},
                "step0_retention": {m: 0.9 for m in variants}, "steps": {}}

    monkeypatch.setattr(accuracy, "accuracy", run)
    argv = ["--sections", "2step", "--iters", "5", "--work-dir", str(tmp_path)]
    assert main(argv + ["--methods", "incdet_memory,incdet_no_memory,finetune,"
                                     "incdet_pseudo@train.lr=0.01"]) == 0
    assert "warning: --methods incdet_memory is deprecated" in capsys.readouterr().err
    assert seen["variants"] == {
        "incdet": ["incremental.method=incdet"],
        "incdet_no_memory": ["incremental.method=incdet", "memory.budget=0"],
        "finetune": ["incremental.method=finetune", "memory.budget=0"],
        "incdet_pseudo@train.lr=0.01": ["incremental.method=incdet", "memory.budget=0",
                                        "incremental.pseudo_labels=true", "train.lr=0.01"]}
    result = json.loads((tmp_path / "benchmark.json").read_text())["results"]["2step"]
    assert result["variants"] == seen["variants"]
    assert list(result["final_ap"]) == list(seen["variants"])
    # the default compares the memory with its absence
    _, args = parsed("benchmark", [])
    assert args.methods == "incdet,incdet_no_memory,finetune,joint"
    with pytest.raises(SystemExit):
        main(argv + ["--methods", "incdet,incdet_memory"])
    assert "--methods: incdet is named twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--methods", "incdet,bogus"])
    assert "--methods: bogus not among incdet" in capsys.readouterr().err


def test_markdown_reads_results_written_with_the_former_names():
    """A section written before the variants were recorded named incdet without memory
    ``incdet`` and with it ``incdet_memory``: the table gives today's names and goals."""
    from incdet.bench.accuracy import over_seeds
    from incdet.bench.markdown import markdown

    old = {"final_ap": {"incdet_memory": 0.6, "incdet": 0.5, "incdet@x=1": 0.4, "joint": 0.62},
           "ratio_to_joint": {"incdet_memory": 0.6 / 0.62, "incdet": 0.5 / 0.62},
           "step0_retention": {"incdet_memory": 0.9, "incdet": 0.7}}
    new = {"final_ap": {"incdet": 0.6, "incdet_no_memory": 0.5, "incdet_no_memory@x=1": 0.4,
                        "joint": 0.62},
           "ratio_to_joint": {"incdet": 0.6 / 0.62, "incdet_no_memory": 0.5 / 0.62},
           "step0_retention": {"incdet": 0.9, "incdet_no_memory": 0.7},
           "variants": {}}
    for seeds in (False, True):
        before, now = (over_seeds({0: old}), over_seeds({0: new})) if seeds else (old, new)
        if seeds:
            now["variants"] = {}
        text = markdown({"results": {"2step": dict(before, iters_per_step=100)}})
        assert text == markdown({"results": {"2step": dict(now, iters_per_step=100)}})
        assert "| 2step: incdet AP, and / joint | 0.600 (1 seed); 0.97 (1 seed) | ≥ 0.95 |" \
            in text
        assert "| 2step: incdet_no_memory AP, and / joint | 0.500 (1 seed); 0.81 (1 seed) | " \
               "≥ 0.85 |" in text
        assert "incdet_memory" not in text


def test_docs_name_the_current_spellings():
    """docs/design.md describes the command line the tools have."""
    text = (ROOT / "docs" / "design.md").read_text()
    for spelling in ("--work-dir", "--out-dir", "--out FILE", "--device"):
        assert spelling in text
