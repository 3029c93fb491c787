"""Every shipped config resolves, and its split resolves against the real class lists."""
import json
from pathlib import Path

import pytest

from incdet.base.config import load_config
from incdet.data.classes import ClassSpace
from incdet.data.synthetic import CATEGORIES as SHAPES
from incdet.data.voc import VOC_CATEGORIES

from conftest import ROOT

COCO = json.loads((ROOT / "incdet" / "data" / "coco_categories.json").read_text())
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("_"))
EXPECTED_STEPS = {"coco_40+40": [40, 40], "coco_70+10": [70, 10],
                  "coco_40+10x4": [40, 10, 10, 10, 10], "coco_40+20x2": [40, 20, 20],
                  "voc_10+10": [10, 10], "voc_15+5": [15, 5], "voc_19+1": [19, 1],
                  "voc_15+1x5": [15, 1, 1, 1, 1, 1], "shapes_2step": [5, 5],
                  "shapes_4step": [4, 2, 2, 2], "shapes_6step": [5, 1, 1, 1, 1, 1],
                  "shapes_joint": [10],
                  "shapes_demo": [5, 5], "shapes_2step_disjoint": [5, 5]}


def test_coco_list_is_the_2017_one():
    assert len(COCO) == 80 and COCO[0] == {"id": 1, "name": "person"}
    assert COCO[-1] == {"id": 90, "name": "toothbrush"}
    assert len({c["id"] for c in COCO}) == 80


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_resolves(path: Path):
    cfg = load_config(path)
    cats = {"coco": COCO, "voc": VOC_CATEGORIES}[cfg["data"]["format"]] \
        if not path.stem.startswith("shapes") else SHAPES
    classes = ClassSpace(cats, cfg["split"], cfg["class_order"])
    assert [len(s) for s in classes.steps] == EXPECTED_STEPS[path.stem]
    assert sorted(classes.order) == sorted(c["id"] for c in cats)
    assert Path(cfg["data"]["root"]).is_absolute()


@pytest.mark.parametrize("name", ["shapes_4step", "shapes_6step"])
def test_long_protocols_share_one_equal_compute_joint(name):
    """Their budgets scale with the classes a step adds, so the equal-compute joint of both
    is the same 2900 iterations on all 10 classes (the 2-step benchmark's 2 x 1450)."""
    from incdet.experiment.methods import incremental_iterations, training_budget

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    classes = ClassSpace(SHAPES, cfg["split"], cfg["class_order"])
    budgets = [training_budget(cfg, classes, [], t, 1) for t in range(classes.num_steps)]
    assert budgets == [290 * len(s) for s in classes.steps]
    assert incremental_iterations(cfg, classes, [], classes.num_steps - 1) == sum(budgets) == 2900


PRETRAINED = sorted((ROOT / "configs" / "pretrained").glob("*.yaml"))
# incremental.lr_scale of the pretrained presets that measured one (benchmarks.md, "Tuning the
# later steps"); the others train their later steps at train.lr
LR_SCALE = {"shapes_6step": 0.3}


def test_every_pretrained_preset_is_its_scratch_preset_with_the_imagenet_recipe():
    """configs/pretrained/NAME.yaml runs the protocol of configs/NAME.yaml (same data, split and
    class order) from torchvision's ImageNet MobileNetV2; and the regimes' protocols each share
    one equal-compute joint, the pretrained joint preset's budget."""
    from incdet.experiment.methods import incremental_iterations

    assert [p.stem for p in PRETRAINED] == ["shapes_2step", "shapes_4step", "shapes_6step",
                                            "shapes_joint"]
    joint = load_config(ROOT / "configs" / "pretrained" / "shapes_joint.yaml")
    joint_classes = ClassSpace(SHAPES, joint["split"], joint["class_order"])
    joint_budget = incremental_iterations(joint, joint_classes, [], 0)
    assert joint_budget == 1200
    for path in PRETRAINED:
        cfg, scratch = load_config(path), load_config(ROOT / "configs" / path.name)
        for key in ("data", "split", "class_order", "memory", "merge"):
            assert cfg[key] == scratch[key], (path.name, key)
        # the method's settings too, but the later steps' learning rate, measured per protocol
        assert dict(cfg["incremental"], lr_scale=1.0) == scratch["incremental"], path.name
        assert cfg["incremental"]["lr_scale"] == LR_SCALE.get(path.stem, 1.0), path.name
        assert (cfg["model"]["backbone"], cfg["model"]["weights"]) == \
            ("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1")
        assert cfg["model"]["norm"] == "batchnorm" and cfg["train"]["backbone_lr_scale"] == 0.3
        classes = ClassSpace(SHAPES, cfg["split"], cfg["class_order"])
        assert incremental_iterations(cfg, classes, [], classes.num_steps - 1) == joint_budget


def test_benchmark_regime_names_the_missing_preset_and_sections_list_their_choices(
        tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main(["--regime", "pretrained", "--sections", "2step-disjoint", "--work-dir",
                   str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "configs/pretrained/shapes_2step_disjoint.yaml does not exist" \
        in err and "shapes_2step, shapes_4step, shapes_6step, shapes_joint" in err
    with pytest.raises(SystemExit) as e:
        tool.main(["--sections", "2stpe", "--work-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown section '2stpe'; choose from throughput" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
