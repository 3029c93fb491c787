"""Importing a trained torchvision RetinaNet as step 0: exact detections, class slots, later
steps, and one clear error per bad input with nothing written."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.experiment import importer
from incdet.model import torchvision as tv
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint

from conftest import ROOT

SMALL = {"min_size": 96, "max_size": 128}


def _stock(arch: str, num_classes: int, seed: int = 0):
    """A stock torchvision RetinaNet with random weights that detects something: random norm
    statistics, classifier biases around 0 (scores above the threshold)."""
    torch.manual_seed(seed)
    if arch.startswith("retinanet_resnet50"):
        model = getattr(torchvision.models.detection, arch)(
            weights=None, weights_backbone=None, num_classes=num_classes, **SMALL)
    else:
        model = tv.build_torchvision(arch, num_classes)
        model.transform.min_size, model.transform.max_size = (SMALL["min_size"],), \
            SMALL["max_size"]
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    bias = model.head.classification_head.cls_logits.bias
    bias.data.copy_(torch.randn(bias.shape, generator=gen))
    return model.eval()


def _images():
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, 90, 120, generator=gen), torch.rand(3, 128, 100, generator=gen)]


def _run_tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "tools/import_detector.py", "--no-progress", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"])
def test_imported_detections_equal_the_stock_detector(arch, tmp_path):
    stock = _stock(arch, 6)
    state_path = tmp_path / "model.pt"
    torch.save(stock.state_dict(), state_path)
    # slot i is category 10 * (6 - i): the class order keeps the slots' order
    classes = [{"id": 10 * (6 - i), "name": f"class{i}"} for i in range(6)]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    r = _run_tool("--state-dict", str(state_path), "--arch", arch, "--classes",
                  str(tmp_path / "classes.json"), "--work-dir", str(tmp_path / "w"),
                  "--set", "model.min_size=96", "--set", "model.max_size=128")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "w" / "step_0" / "checkpoint.pt")
    assert ckpt["class_order"] == [60, 50, 40, 30, 20, 10] and ckpt["head_layout"] == [6]
    mcfg = ckpt["config"]["model"]
    assert mcfg["p6_from"] == ("c5" if arch.endswith("v2") else "p5")
    assert mcfg["head_norm"] == ("groupnorm" if arch.endswith("v2") else "none")
    assert mcfg["anchor_sizes"][0] == [32.0, 40.0, 50.0] and mcfg["head_convs"] == 4
    assert ckpt["config"]["loss"]["box"] == ("giou" if arch.endswith("v2") else "l1")
    imported = model_from_checkpoint(ckpt)
    with torch.no_grad():
        reference, got = stock(_images()), imported(_images())
    order = torch.tensor(ckpt["class_order"])
    for ref, out in zip(reference, got):
        assert len(ref["boxes"]) > 50  # the comparison covers many detections
        assert torch.equal(torch.tensor([classes[i]["id"] for i in ref["labels"]]),
                           order[out["labels"]])
        torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(out["scores"], ref["scores"], rtol=0, atol=1e-5)
    metrics = json.loads((tmp_path / "w" / "step_0" / "metrics.json").read_text())
    assert metrics["method"] == "imported" and metrics["classes"]["new"] == ckpt["class_order"]


def test_weights_name_reads_the_cache_and_drops_slots_that_are_no_class(tmp_path, monkeypatch):
    weights = torchvision.models.detection.RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="not in the local torch cache.*never downloads"):
        tv.torchvision_from_weights(str(weights))
    stock = _stock("retinanet_resnet50_fpn_v2", 91)
    names = weights.meta["categories"]
    dead = [i for i, n in enumerate(names) if n in tv.NOT_A_CLASS]
    assert dead[0] == 0 and len(dead) == 11
    bias = stock.head.classification_head.cls_logits.bias.data.view(9, 91)
    bias[:, dead] = -20.0  # trained slots that never fire
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(stock.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    model, slots, arch = tv.torchvision_from_weights(str(weights))
    assert arch == "retinanet_resnet50_fpn_v2" and len(slots) == 91
    importer.import_detector(model, slots, load_config(None), tmp_path / "w", str(weights),
                             progress=False, overrides=["model.min_size=96",
                                                        "model.max_size=128"])
    ckpt = load_checkpoint(tmp_path / "w" / "step_0" / "checkpoint.pt")
    assert ckpt["head_layout"] == [80] and ckpt["names"]["1"] == "person"
    assert ckpt["class_order"][:3] == [1, 2, 3] and 12 not in ckpt["class_order"]  # 12 is N/A
    imported = model_from_checkpoint(ckpt)
    model.transform.min_size, model.transform.max_size = (96,), 128
    with torch.no_grad():
        reference, got = model(_images()), imported(_images())
    order = torch.tensor(ckpt["class_order"])
    for ref, out in zip(reference, got):
        assert torch.equal(ref["labels"], order[out["labels"]])  # stock label = category id
        torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(out["scores"], ref["scores"], rtol=0, atol=1e-5)


def _small_imported(tmp_path, tiny_dataset, arch="retinanet_resnet18_fpn_v2"):
    """A resnet18 detector of the tiny dataset's first 5 classes, imported into tmp_path/w."""
    stock = _stock(arch, 5)
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(f"""
data: {{root: {tiny_dataset}, synthetic: {{generate: false}}}}
train: {{max_iters: 2, batch_size: 4, num_workers: 0, warmup_iters: 1}}
memory: {{budget: 0}}
""")
    cats = json.loads((tiny_dataset / "annotations" / "train.json").read_text())["categories"]
    slots = [{"id": c["id"], "name": c["name"]} for c in sorted(cats, key=lambda c: c["id"])[:5]]
    cfg = load_config(cfg_path, ["model.min_size=64", "model.max_size=64"])
    metrics = importer.import_detector(stock, slots, cfg, tmp_path / "w", "test", evaluate=True,
                                       progress=False)
    return stock, slots, metrics


def test_later_steps_grow_the_imported_head(tmp_path, tiny_dataset):
    from incdet.experiment import methods
    from incdet.experiment.loaders import load_experiment
    from incdet.experiment.step import run_step

    _, slots, metrics = _small_imported(tmp_path, tiny_dataset)
    assert metrics["map"]["all"]["AP"] is not None  # evaluated on the config's validation set
    step1 = tmp_path / "step1.yaml"
    step1.write_text(f"_base_: {tmp_path / 'w' / 'step_0' / 'config.yaml'}\nsplit: '5+5'\n")
    cfg = load_config(step1)
    # a torchvision ResNet detector is fine-tuned with torchvision's reference recipe (lr for
    # batch 4: 0.01 * 4 / 16), which step 0's config.yaml hands on to the next steps
    recipe = {"train.optimizer": "sgd", "train.lr": 0.0025, "train.weight_decay": 0.0001,
              "augment.scale_p": 0.0, "augment.crop_p": 0.0, "augment.brightness_contrast_p": 0.0}
    assert metrics["imported"]["recipe"] == recipe
    assert {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in recipe} == recipe
    _, _, classes = load_experiment(cfg, progress=False)
    sc = classes.step(1)
    previous = load_checkpoint(tmp_path / "w" / "step_0" / "checkpoint.pt")
    imported = model_from_checkpoint(previous)
    plan = methods.plan_step("incdet", classes, sc)
    student = methods.build_student(cfg, sc, plan, previous).eval()
    feats = list(imported.backbone(torch.rand(2, 3, 64, 64)).values())
    with torch.no_grad():
        before = imported.head.classification_head(feats)
        after = student.head.classification_head(feats)
    assert after.shape[-1] == 10 and torch.equal(after[..., :5], before)
    m = run_step(cfg, 1, tmp_path / "w", progress=False)
    assert m["classes"]["old"] == [s["id"] for s in slots] and m["step"] == 1
    # one writer: the imported step 0 and the trained step 1 share metrics.json's schema
    assert set(metrics) - {"imported"} == set(m) and set(metrics["train"]) == set(m["train"])
    assert metrics["train"]["device"] == "cpu" and metrics["config_digest"]


def test_branch_after_import_keeps_old_detections_and_ap(tmp_path, tiny_dataset):
    from incdet.experiment.step import run_step

    _, _, metrics0 = _small_imported(tmp_path, tiny_dataset)
    step1 = tmp_path / "step1.yaml"
    step1.write_text(f"_base_: {tmp_path / 'w' / 'step_0' / 'config.yaml'}\nsplit: '5+5'\n"
                     "incremental: {method: branch}\n")
    m = run_step(load_config(step1), 1, tmp_path / "w", progress=False)
    assert m["groups"]["step_0"] == metrics0["groups"]["step_0"]  # to the last digit
    assert m["forgetting"]["step_0"] == 0.0


def test_mobilenet_backbone_of_torchvision_is_refused_clearly():
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", fpn=True,
                                  weights=None, trainable_layers=6)
    model = RetinaNet(backbone, 3)
    with pytest.raises(UserError, match="cannot be imported.*mobilenet_backbone reads two"):
        tv.settings_of(model)


def test_class_lists_that_do_not_fit_are_clear_errors():
    with pytest.raises(UserError, match="3 classes given but the detector has 5 output slots"):
        tv.slot_classes(5, [{"id": 1, "name": "a"}] * 3, "c.json")
    with pytest.raises(UserError, match="category id 7 has no output slot.*5 slots"):
        tv.slot_classes(5, {"categories": [{"id": 7, "name": "x"}]}, "ann.json")
    with pytest.raises(UserError, match="appears twice"):
        tv.slot_classes(2, [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "c.json")
    slots = tv.slot_classes(3, {"categories": [{"id": 2, "name": "b"},
                                               {"id": 1, "name": "a"}]}, "ann.json")
    assert slots == [None, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    meta = {"category_ids": [7, 3], "names": ["x", "y"]}  # tools/export.py OUT.json
    assert tv.slot_classes(2, meta, "m.json") == [{"id": 7, "name": "x"},
                                                  {"id": 3, "name": "y"}]


def test_new_classes_colliding_with_imported_ids_get_free_ids_or_are_refused(tmp_path,
                                                                             tiny_dataset):
    from incdet.experiment.loaders import load_experiment

    overrides = [f"data.root={tiny_dataset}", "data.synthetic.generate=false",
                 "categories=[{id: 1, name: person}]", "split=1+10"]
    # data.category_ids auto (the default): circle (id 1 in the files) takes the first free id
    train_set, val_set, classes = load_experiment(load_config(None, overrides), progress=False)
    top = max(classes.names)
    assert classes.names[1] == "person" and classes.names[top] == "circle" and \
        sorted(classes.names)[-2] < top  # the lowest id above every id in use
    assert 1 not in {int(c) for r in train_set.records + val_set.records for c in r.category_ids}
    with pytest.raises(UserError, match="category id 1 is 'circle' there but 'person' in the "
                                        "imported detector.*data.category_ids: auto"):
        load_experiment(load_config(None, overrides + ["data.category_ids=file"]),
                        progress=False)


def _fails_and_writes_nothing(tmp_path, args, message):
    r = _run_tool(*args, "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"id": i + 1, "name": f"c{i}"} for i in range(4)]))
    frcnn = tmp_path / "frcnn.pt"
    torch.save({"rpn.head.conv.0.0.weight": torch.zeros(1),
                "roi_heads.box_head.fc6.weight": torch.zeros(1)}, frcnn)
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(frcnn), "--arch",
                                         "retinanet_resnet50_fpn", "--classes", str(classes)],
                              "not a RetinaNet state dict")
    classifier = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), classifier)
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(classifier), "--arch",
                                         "retinanet_resnet18_fpn", "--classes", str(classes)],
                              "an image classifier")
    stock = tv.build_torchvision("retinanet_resnet18_fpn", 4)
    v1 = tmp_path / "r18.pt"
    torch.save(stock.state_dict(), v1)
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(v1), "--arch",
                                         "retinanet_resnet18_fpn_v2", "--classes", str(classes)],
                              "does not fit retinanet_resnet18_fpn_v2")
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(v1), "--arch",
                                         "retinanet_resnet34_fpn", "--classes", str(classes)],
                              "does not fit retinanet_resnet34_fpn")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"id": 1, "name": "a"}]))
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(v1), "--arch",
                                         "retinanet_resnet18_fpn", "--classes", str(wrong)],
                              "1 classes given but the detector has 4 output slots")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": object()}, pickled)
    _fails_and_writes_nothing(tmp_path, ["--state-dict", str(pickled), "--arch",
                                         "retinanet_resnet18_fpn", "--classes", str(classes)],
                              "cannot load")
    ok = _run_tool("--state-dict", str(v1), "--arch", "retinanet_resnet18_fpn", "--classes",
                   str(classes), "--work-dir", str(tmp_path / "w"))
    assert ok.returncode == 0, ok.stderr
    again = _run_tool("--state-dict", str(v1), "--arch", "retinanet_resnet18_fpn", "--classes",
                      str(classes), "--work-dir", str(tmp_path / "w"))
    assert again.returncode == 2 and "step 0 already exists" in again.stderr


def test_protocol_runner_starts_every_method_from_the_imported_step(tmp_path, tiny_dataset):
    from incdet.experiment.protocol import method_variants, run_protocol

    _, slots, metrics0 = _small_imported(tmp_path, tiny_dataset)
    # a config of the data only: the model settings and classes come from --step0
    cfg = load_config(tmp_path / "data.yaml", ["split=5+5"])
    res = run_protocol(cfg, tmp_path / "p", method_variants(["branch", "finetune"]),
                       progress=False, step0=tmp_path / "w" / "step_0")
    assert [m["step"] for m in res["branch"]] == [0, 1] and res["branch"][0]["method"] == "imported"
    assert res["branch"][1]["groups"]["step_0"] == metrics0["groups"]["step_0"]
    assert res["finetune"][1]["classes"]["old"] == [s["id"] for s in slots]
    with pytest.raises(UserError, match="not a finished step_0 folder"):
        run_protocol(cfg, tmp_path / "q", method_variants(["branch"]), progress=False,
                     step0=tmp_path / "w")


def test_an_imported_detector_exports_as_a_state_dict_that_loads_back(tmp_path, tiny_dataset):
    """Its norms are frozen and its config names no weights file: the state dict holds every
    weight, so rebuilding it for export (and for import --arch incdet) needs none."""
    from incdet.deploy.export import export

    stock, _, _ = _small_imported(tmp_path, tiny_dataset)
    meta = export(tmp_path / "w" / "step_0" / "checkpoint.pt", "state_dict", tmp_path / "d.pt",
                  device="cpu")
    cfg = load_config(tmp_path / "w" / "step_0" / "config.yaml")
    rebuilt = tv.load_torchvision(tmp_path / "d.pt", tv.INCDET_ARCH, "d.pt", cfg["model"])
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        a, b = stock.eval()([image])[0], rebuilt([image])[0]
    assert meta["format"] == "state_dict" and torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
    assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
