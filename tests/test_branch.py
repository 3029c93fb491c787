"""The ``branch`` method: old classes frozen by construction, bit for bit; per-step caps keep old
detections; export of a model with several towers."""
import copy
import json

import pytest
import torch

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.deploy.detector import load_detector
from incdet.deploy.export import ExportModule, export
from incdet.experiment import methods
from incdet.experiment.loaders import load_experiment
from incdet.experiment.step import run_step
from incdet.model.builder import IncrementalRetinaNet, build_model, grow_model
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.model.heads import IncrementalClassificationHead, IncrementalHead
from incdet.model.torchvision import BranchedClassificationHead

SIZES = ((64, 64), (48, 80))


@pytest.fixture(scope="module", params=["tower", "fpn", "backbone"])
def branched(tiny_dataset, tmp_path_factory, request):
    """Step 0 (5 classes), then a branch step (5 more; its own tower, or its own tower and FPN
    copy, or its own tower, FPN and backbone body copies); every detection kept (score_thresh
    0) and few per image, so that the caps bind."""
    tmp = tmp_path_factory.mktemp("branch")
    path = tmp / "tiny.yaml"
    path.write_text(f"""
data: {{root: {tiny_dataset}, synthetic: {{generate: false}}}}
split: "5+5"
model: {{min_size: 64, max_size: 64, fpn_channels: 16, head_convs: 1, score_thresh: 0.0,
        detections_per_img: 20, topk_candidates: 50}}
train: {{max_iters: 3, batch_size: 4, num_workers: 0, warmup_iters: 1, lr: 0.005}}
incremental: {{method: branch, branch_from: {request.param}}}
memory: {{budget: 0}}
""")
    cfg = load_config(path)
    m0 = run_step(cfg, 0, tmp / "w", progress=False)
    m1 = run_step(cfg, 1, tmp / "w", progress=False)
    return cfg, tmp / "w", m0, m1


def _images():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) for h, w in SIZES]


def test_a_tower_per_branch_step_and_old_logits_bit_identical():
    torch.manual_seed(0)
    head = IncrementalClassificationHead(16, 3, [4], num_convs=2).eval()
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    with torch.no_grad():
        before = head(feats)
        head.grow(3, new_tower=True)
        for p in head.branches[0].parameters():  # the new tower trains: it may move
            p.add_(0.1)
        after = head(feats)
    assert head.tower_of_step == [0, 1] and len(head.towers()) == 2
    assert torch.equal(after[..., :4], before)
    rebuilt = IncrementalClassificationHead(16, 3, [4, 3], num_convs=2, towers=[0, 1])
    assert rebuilt.state_dict().keys() == head.state_dict().keys()
    with pytest.raises(ValueError, match="do not fit 2 steps"):
        IncrementalClassificationHead(16, 3, [4, 3], towers=[0, 2])


def test_a_tower_on_its_own_fpn_reads_its_channels_only():
    """With an FPN copy the backbone's maps hold both FPNs (FPN 0 first): the old tower and the
    box subnet read FPN 0's channels, so changing the copy's features moves new logits only."""
    torch.manual_seed(0)
    head = IncrementalHead(16, 3, [4, 3], num_convs=1, towers=[0, 1], fpns=[0, 1]).eval()
    assert head.classification_head.fpn_of_tower == [0, 1]
    own = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    copy_a = [torch.randn_like(f) for f in own]
    copy_b = [torch.randn_like(f) for f in own]
    with torch.no_grad():
        single = head(own)
        a = head([torch.cat([f, g], 1) for f, g in zip(own, copy_a)])
        b = head([torch.cat([f, g], 1) for f, g in zip(own, copy_b)])
    assert torch.equal(a["cls_logits"][..., :4], single["cls_logits"][..., :4])
    assert torch.equal(a["cls_logits"][..., :4], b["cls_logits"][..., :4])
    assert not torch.equal(a["cls_logits"][..., 4:], b["cls_logits"][..., 4:])
    assert torch.equal(a["bbox_regression"], single["bbox_regression"])
    with pytest.raises(ValueError, match="tower 0 reads FPN 0"):
        IncrementalClassificationHead(16, 3, [4, 3], towers=[0, 1], fpns=[0, 2])


def test_branch_trains_only_its_tower_and_classifier(branched):
    cfg, work, _, _ = branched
    before = load_checkpoint(work / "step_0" / "checkpoint.pt")["model"]
    after = load_checkpoint(work / "step_1" / "checkpoint.pt")
    assert after["head_towers"] == [0, 1] and after["head_layout"] == [5, 5]
    fpn = cfg["incremental"]["branch_from"] in ("fpn", "backbone")
    body = cfg["incremental"]["branch_from"] == "backbone"
    assert after["head_fpns"] == ([0, 1] if fpn else [0, 0])
    assert after["fpn_bodies"] == ([0, 1] if body else [0] * (1 + fpn))
    state = after["model"]
    for key, value in before.items():  # backbone (BN statistics too), FPN, box head, tower 0
        assert torch.equal(state[key], value), key
    changed = [k for k in state if k not in before and "classification_head.branches.0" in k
               and not torch.equal(state[k], state[k.replace("branches.0", "conv")])]
    assert changed  # the branch's own tower trained away from its copy
    for copy_of, own in (("fpn", fpn), ("body", body)):
        # the copy exists with its branch_from only, started from the original, and trained
        copies = [k for k in state if k not in before and f"{copy_of}_branches.0" in k]
        assert bool(copies) == own, copy_of
        assert all(k.replace(f"{copy_of}_branches.0", copy_of) in before for k in copies)
        assert not own or any(
            not torch.equal(state[k], before[k.replace(f"{copy_of}_branches.0", copy_of)])
            for k in copies)


def test_branch_old_logits_and_detections_equal_the_previous_model(branched):
    cfg, work, m0, m1 = branched
    old = model_from_checkpoint(load_checkpoint(work / "step_0" / "checkpoint.pt"))
    new = model_from_checkpoint(load_checkpoint(work / "step_1" / "checkpoint.pt"))
    assert isinstance(new, IncrementalRetinaNet) and new.class_groups == [5, 5]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f_old, f_new = old.backbone(x), new.backbone(x)
        lo = old.head.classification_head(list(f_old.values()))
        ln = new.head.classification_head(list(f_new.values()))
        det_old, det_new = old(_images()), new(_images())
    assert torch.equal(ln[..., :5], lo)
    for a, b in zip(det_old, det_new):
        keep = b["labels"] < 5
        assert len(a["boxes"]) == 20 and int((~keep).sum()) > 0  # new classes detect too
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k][keep]), k
    # so the step-0 classes' evaluated AP is exactly what it was
    assert m1["groups"]["step_0"] == m0["groups"]["step_0"]
    assert m1["forgetting"]["step_0"] == 0.0


def test_shared_caps_can_push_old_detections_out(branched):
    cfg, work, _, _ = branched
    ckpt = load_checkpoint(work / "step_1" / "checkpoint.pt")
    shared = copy.deepcopy(cfg)
    shared["model"]["caps_per_step"] = False
    model = model_from_checkpoint(ckpt, shared)
    assert type(model).__name__ == "RetinaNet"
    with torch.no_grad():
        model.head.classification_head.classifiers[1].bias.fill_(5.0)  # new classes score high
        out = model(_images())
    assert all(int((o["labels"] < 5).sum()) == 0 for o in out)  # every old detection pushed out


def test_branch_needs_no_teacher_and_trains_the_new_label_space(tiny_config):
    cfg = load_config(tiny_config, ["incremental.method=branch"])
    _, _, classes = load_experiment(cfg, progress=False)
    sc = classes.step(1)
    plan = methods.plan_step("branch", classes, sc, memory=True)
    assert not plan.uses_teacher and not plan.uses_memory and plan.uses_previous
    assert plan.label_space == tuple(classes.labels(sc.new))
    previous = build_model(cfg["model"], [4])
    ckpt = {"model": previous.state_dict(), "head_layout": [4]}
    student = methods.build_student(cfg, sc, plan, ckpt)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.classification_head.branches.0.",
                                           "head.classification_head.classifiers.1."))
                             for n in trainable)
    student.train()
    from incdet.model.builder import keep_frozen_norms

    keep_frozen_norms(student)
    assert not any(m.training for m in student.backbone.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))


def test_grow_model_keeps_the_caps_groups_in_step():
    mcfg = dict(load_config(None)["model"], fpn_channels=16, head_convs=1)
    model = build_model(mcfg, [3], per_step_caps=True)
    grow_model(model, 2, new_tower=True)
    assert model.class_groups == [3, 2]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_branched_model_exports_and_matches_eager(branched, tmp_path, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    _, work, _, _ = branched
    ckpt_path = work / "step_1" / "checkpoint.pt"
    detector = load_detector(ckpt_path)
    assert isinstance(detector, IncrementalRetinaNet)
    assert isinstance(detector.head.classification_head, BranchedClassificationHead)
    eager = model_from_checkpoint(load_checkpoint(ckpt_path))
    images = _images()
    with torch.no_grad():
        for a, b in zip(eager(images), detector(images)):
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
    out = tmp_path / ("det.pt" if fmt == "torchscript" else "det.onnx")
    meta = export(ckpt_path, fmt, out, check_images=images)  # export checks itself
    assert json.loads((tmp_path / (out.name + ".json")).read_text()) == meta
    module = ExportModule(detector, meta["category_ids"]).eval()
    with torch.no_grad():
        _, _, ids = module(images[0])
    assert len(ids) == 40  # 20 per step group


def test_a_branched_model_is_no_plain_state_dict(branched, tmp_path):
    """Its classifier towers and per-step caps are not torchvision's: --format state_dict
    refuses it, naming the formats that keep them, and writes nothing."""
    _, work, _, _ = branched
    with pytest.raises(UserError, match="not a plain torchvision RetinaNet.*torchscript or onnx"):
        export(work / "step_1" / "checkpoint.pt", "state_dict", tmp_path / "det.pt",
               check_images=_images())
    assert list(tmp_path.iterdir()) == []


def test_fpn_bodies_must_be_what_branch_steps_build():
    mcfg = dict(load_config(None)["model"], fpn_channels=16, head_convs=1)
    model = build_model(mcfg, [3, 2, 2], towers=[0, 1, 2], fpns=[0, 1, 2], bodies=[0, 1, 1])
    assert len(model.backbone.body_branches) == 1 and model.backbone.fpn_bodies() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"FPN bodies \[0, 2, 2\] do not fit 3 FPNs"):
        build_model(mcfg, [3, 2, 2], towers=[0, 1, 2], fpns=[0, 1, 2], bodies=[0, 2, 2])
