"""Merging detectors by distillation: the class space, the loss, teachers on the student's anchors,
and merged step folders that evaluate, export and continue like any step."""
import copy
import json
import shutil

import pytest
import torch

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.deploy.export import export
from incdet.experiment.merge import (
    build_student,
    load_teacher,
    merge,
    resolve_settings,
    union_classes,
)
from incdet.experiment.step import run_step
from incdet.experiment.step_folder import config_digest
from incdet.model.builder import batch_transform, build_model
from incdet.model.checkpoint import load_checkpoint
from incdet.tools.merge import main as merge_main
from incdet.train.distill import select_anchors, select_by_scores
from incdet.train.merging import (
    MergeCriterion,
    MergeTeacher,
    _grid_index,
    box_distillation,
    soft_focal_distillation,
    teacher_dense,
)

TEACHER_A = ("a", (1, 2, 4), {1: "circle", 2: "triangle", 4: "square"}, [(1, 2), (4,)])
B = ("b", (5, 7), {5: "hexagon", 7: "star"}, [(5, 7)])
MCFG = {"temperature": 2.0, "gamma": 2.0, "box_thresh": 0.5}
TINY = {"min_size": 64, "max_size": 64, "fpn_channels": 16, "head_convs": 1}
A = 3  # anchors per location of the default model (3 scales, 1 aspect ratio)


def test_union_keeps_each_teachers_steps_in_order_and_says_who_answers():
    merged = union_classes([TEACHER_A, B])
    assert merged.steps == [(1, 2), (4,), (5, 7)] and merged.order == (1, 2, 4, 5, 7)
    assert merged.answers == [[(0, 0), (1, 1), (2, 2)], [(3, 0), (4, 1)]]
    assert merged.categories()[3] == {"id": 5, "name": "hexagon"}


def test_union_collisions_are_one_line_errors_unless_a_rule_settles_them():
    renamed = ("c", (4, 9), {4: "box", 9: "cross"}, [(4, 9)])
    with pytest.raises(UserError, match=r"category id 4 is 'square' in a but 'box' in c"):
        union_classes([TEACHER_A, renamed])
    again = ("d", (4, 9), {4: "square", 9: "cross"}, [(4, 9)])
    with pytest.raises(UserError, match=r"class 4 \('square'\) is known to a and d: .*--overlap"):
        union_classes([TEACHER_A, again])
    with pytest.raises(UserError, match="merge.overlap"):
        union_classes([TEACHER_A, again], "vote")
    first = union_classes([TEACHER_A, again], "first")
    assert first.steps == [(1, 2), (4,), (9,)]
    assert first.answers == [[(0, 0), (1, 1), (2, 2)], [(3, 1)]]  # 4 is a's alone
    mean = union_classes([TEACHER_A, again], "mean")
    assert mean.answers[1] == [(2, 0), (3, 1)]  # d answers for 4 too


def test_classification_distillation_is_zero_with_zero_gradient_when_student_is_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 50, 3) * 4
    target = torch.sigmoid(teacher / 2.0)
    conf = torch.sigmoid(teacher).amax(-1)
    student = teacher.clone().requires_grad_(True)
    loss = soft_focal_distillation(student, target, conf, 2.0, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max().item() == 0.0
    other = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    moved = soft_focal_distillation(other, target, conf, 2.0, 2.0)
    moved.backward()
    assert moved.item() > 0 and other.grad.abs().max().item() > 0
    # a gradient step towards the teacher lowers it
    with torch.no_grad():
        closer = other - 0.5 * other.grad / other.grad.abs().max()
    assert soft_focal_distillation(closer, target, conf, 2.0, 2.0) < moved
    # normalised by the soft number of objects
    assert torch.isclose(soft_focal_distillation(other, target, conf * 2, 2.0, 2.0),
                         moved / 2, rtol=1e-5)


def test_selected_anchors_alone_are_distilled_and_counted():
    torch.manual_seed(1)
    teacher = torch.randn(2, 40, 3) - 5.0  # background, and a few objects
    teacher[:, :3, 0] += 8.0
    target, conf = torch.sigmoid(teacher / 2.0), torch.sigmoid(teacher).amax(-1)
    student = torch.randn(2, 40, 3).requires_grad_(True)
    everywhere = torch.ones(2, 40, dtype=torch.bool)
    assert torch.equal(soft_focal_distillation(student, target, conf, 2.0, 0.0, everywhere),
                       soft_focal_distillation(student, target, conf, 2.0, 0.0))
    mask = select_by_scores(conf, "erd")
    assert torch.equal(mask, select_anchors(teacher, "erd"))
    assert 0 < mask.sum() < mask.numel()
    loss = soft_focal_distillation(student, target, conf, 2.0, 0.0, mask)
    loss.backward()
    assert student.grad[~mask].abs().max().item() == 0.0
    assert student.grad[mask].abs().max().item() > 0.0
    # the same as distilling the selected anchors alone, normalised by their confidence
    alone = soft_focal_distillation(student[mask][None], target[mask][None], conf[mask][None],
                                    2.0, 0.0)
    assert torch.isclose(loss, alone, rtol=1e-6)


def test_box_distillation_weighs_anchors_by_the_teachers_confidence():
    s, t = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    weight = torch.tensor([[0.0, 0.5, 1.0]])
    assert box_distillation(s, t, weight).item() == pytest.approx((0.5 * 4 + 1.0 * 4) / 1.5)
    assert box_distillation(t, t, weight).item() == 0.0


def test_grid_index_takes_the_teacher_cell_under_each_student_cell_centre():
    rows, cols = _grid_index((8, 8), (8, 8), (8.0, 8.0), (8.0, 8.0), (1.0, 1.0), "cpu")
    assert rows.tolist() == list(range(8)) and cols.tolist() == list(range(8))
    rows, cols = _grid_index((16, 16), (8, 8), (8.0, 8.0), (8.0, 8.0), (2.0, 2.0), "cpu")
    assert rows.tolist() == [2 * i + 1 for i in range(8)]


def _model(seed, classes, **extra):
    torch.manual_seed(seed)
    cfg = dict(load_config(None)["model"], **dict(TINY, **extra))
    return build_model(cfg, [classes]).eval()


def _images(n=2, size=64):
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, size, size, generator=gen) for _ in range(n)]


def test_teacher_on_the_students_grid_gives_its_own_outputs():
    student, teacher = _model(0, 5), _model(1, 3)
    images = _images()
    image_list, _ = batch_transform(student.transform, images)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    logits, boxes = teacher_dense(teacher, images, image_list, shapes, A)
    with torch.no_grad():
        out = teacher.head(list(teacher.backbone(image_list.tensors).values()))
    assert torch.equal(logits, out["cls_logits"]) and boxes.shape == (2, logits.shape[1], 4)
    # a teacher that sees the images at twice the size still lands on the student's anchors
    big = _model(1, 3, min_size=128, max_size=128)
    logits2, boxes2 = teacher_dense(big, images, image_list, shapes, A)
    assert logits2.shape == logits.shape and boxes2.shape == boxes.shape
    assert boxes2.abs().max() < 64 * 4  # boxes are in the student's image (64 px), not 128


def test_box_teacher_is_the_most_confident_one_per_anchor():
    student = _model(0, 5)
    t1, t2 = _model(1, 3), _model(2, 2)
    with torch.no_grad():  # logits that vary from anchor to anchor, around t2's
        t1.head.classification_head.classifiers[0].weight.mul_(300)
    crit = MergeCriterion(student, [MergeTeacher(t1, [0, 1, 2], [0, 1, 2]),
                                    MergeTeacher(t2, [3, 4], [0, 1])], 5, MCFG)
    images = _images()
    image_list, _ = batch_transform(student.transform, images)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    prob, conf, boxes, box_conf = crit.targets(images, image_list, shapes)
    l1, b1 = teacher_dense(t1, images, image_list, shapes, A)
    l2, b2 = teacher_dense(t2, images, image_list, shapes, A)
    c1, c2 = torch.sigmoid(l1).amax(-1), torch.sigmoid(l2).amax(-1)
    first = c1 >= c2  # a tie goes to the first teacher
    assert first.any() and (~first).any()
    expect = torch.where(first[..., None], b1, b2)
    assert torch.equal(boxes, expect) and torch.equal(box_conf, torch.maximum(c1, c2))
    assert torch.allclose(prob[:, :, :3], torch.sigmoid(l1 / 2.0))
    assert torch.allclose(prob[:, :, 3:], torch.sigmoid(l2 / 2.0))
    with pytest.raises(ValueError, match="no teacher"):
        MergeCriterion(student, [MergeTeacher(t1, [0, 1, 2], [0, 1, 2])], 5, MCFG)


def test_labelled_classes_learn_from_their_boxes_alone():
    """merge.annotated: labels: no teacher answers for the labelled classes, in either term."""
    student = _model(0, 5)
    t1 = _model(1, 3)
    images = _images()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([3]),
                "label_space": torch.tensor([3, 4])} for _ in images]
    from incdet.train.losses import DetectionLoss
    detection = DetectionLoss(load_config(None)["loss"], student.box_coder,
                              student.proposal_matcher)
    crit = MergeCriterion(student, [MergeTeacher(t1, [0, 1, 2], [0, 1, 2])], 5, MCFG,
                          detection, labelled=[3, 4])
    assert crit.distilled == [0, 1, 2]
    student.train()
    logits = {}

    def keep(module, args, out):  # the classification logits, to read their gradient
        out.retain_grad()
        logits["z"] = out

    hook = student.head.classification_head.register_forward_hook(keep)
    losses = crit(images, targets)
    hook.remove()
    losses["loss_distill_cls"].backward(retain_graph=True)
    grad = logits["z"].grad
    assert grad[:, :, 3:].abs().max().item() == 0.0 and grad[:, :, :3].abs().max().item() > 0
    assert {"loss_cls", "loss_box"} <= set(losses)
    with pytest.raises(ValueError, match="learn from labels alone"):
        MergeCriterion(student, [MergeTeacher(t1, [0, 1, 2], [0, 1, 2]),
                                 MergeTeacher(_model(2, 2), [3, 4], [0, 1])], 5, MCFG,
                       detection, labelled=[3, 4])
    with pytest.raises(ValueError, match="no teacher"):
        MergeCriterion(student, [MergeTeacher(t1, [0, 1, 2], [0, 1, 2])], 5, MCFG, detection,
                       labelled=[4])
    # every class labelled: the ground truth alone, the distillation terms zero
    alone = MergeCriterion(student, [], 5, MCFG, detection, labelled=range(5))
    out = alone(images, targets)
    assert out["loss_distill_cls"].item() == 0.0 and out["loss_cls"].item() > 0


def test_auto_settings_follow_the_use_merging_or_compressing():
    auto = {"gamma": "auto", "box_thresh": "auto", "annotated": "auto", "cls_weight": "auto",
            "anchors": "auto"}
    assert resolve_settings(auto, True) == {"gamma": 0.0, "box_thresh": 0.2, "anchors": "erd",
                                            "annotated": "labels", "cls_weight": 0.25}
    assert resolve_settings(auto, False) == {"gamma": 2.0, "box_thresh": 0.5, "anchors": "all",
                                             "annotated": "distil", "cls_weight": 1.0}
    given = {"gamma": 1, "box_thresh": "0.3", "annotated": "distil", "cls_weight": 2,
             "anchors": "all"}
    assert resolve_settings(given, True) == {"gamma": 1.0, "box_thresh": 0.3, "anchors": "all",
                                             "annotated": "distil", "cls_weight": 2.0}
    with pytest.raises(UserError, match=r"merge.gamma: 'high' is neither auto nor a number"):
        resolve_settings(dict(auto, gamma="high"), True)
    with pytest.raises(UserError, match=r"merge.box_thresh: -0.1 is negative"):
        resolve_settings(dict(auto, box_thresh=-0.1), True)
    with pytest.raises(UserError, match="merge.annotated"):
        resolve_settings(dict(auto, annotated="both"), True)
    with pytest.raises(UserError, match="merge.anchors"):
        resolve_settings(dict(auto, anchors="topk"), True)


def _write_config(path, dataset, split, **extra):
    lines = [f"data: {{root: {dataset}, synthetic: {{generate: false}}}}",
             f"split: {json.dumps(split)}",
             "model: {min_size: 64, max_size: 64, fpn_channels: 16, head_convs: 1}",
             "train: {max_iters: 3, batch_size: 4, num_workers: 0, warmup_iters: 1, lr: 0.005}",
             "memory: {budget: 0}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def teachers(tiny_dataset, tmp_path_factory):
    """Teacher A: step 0 of a 4+3+3 split (classes 1 2 4 5); teacher B: a detector trained
    apart on classes 7 9 11 alone."""
    tmp = tmp_path_factory.mktemp("merge")
    cfg_a = _write_config(tmp / "a.yaml", tiny_dataset, "4+3+3")
    cfg_b = _write_config(tmp / "b.yaml", tiny_dataset, [[7, 9, 11]])
    run_step(load_config(cfg_a), 0, tmp / "a", progress=False)
    run_step(load_config(cfg_b), 0, tmp / "b", progress=False)
    return tmp, cfg_a


def test_merged_step_folder_evaluates_exports_and_continues(teachers, tmp_path):
    tmp, cfg_a = teachers
    cfg = load_config(cfg_a, ["merge.iters=3", "merge.transfer_step=1"])
    metrics = merge([tmp / "a" / "step_0", tmp / "b" / "step_0"], tmp_path / "m", cfg,
                    progress=False)
    step_dir = tmp_path / "m" / "step_1"
    assert metrics["step"] == 1 and metrics["method"] == "merge"
    assert metrics["classes"] == {"old": [1, 2, 4, 5], "new": [7, 9, 11]}
    assert metrics["merge"]["answers"] == [[1, 2, 4, 5], [7, 9, 11]]
    assert metrics["merge"]["transfer"]["labels"] is True  # step 1's boxes of 7 9 11
    # the student starts from teacher A: merging settings, 7 9 11 learnt from their boxes
    assert (metrics["merge"]["gamma"], metrics["merge"]["box_thresh"],
            metrics["merge"]["annotated"], metrics["merge"]["cls_weight"],
            metrics["merge"]["anchors"]) == (0.0, 0.2, "labels", 0.25, "erd")
    assert set(metrics["per_class_ap"]) == {"1", "2", "4", "5", "7", "9", "11"}
    assert json.loads((step_dir / "metrics.json").read_text()) == metrics
    # one writer: a merged step's metrics.json has a trained step's schema, plus its own section
    trained = json.loads((tmp / "a" / "step_0" / "metrics.json").read_text())
    assert set(metrics) - {"merge"} == set(trained) and set(metrics["train"]) == \
        set(trained["train"])
    assert metrics["config_digest"] == config_digest(load_config(step_dir / "config.yaml"))
    ckpt = load_checkpoint(step_dir / "checkpoint.pt")
    assert ckpt["head_layout"] == [4, 3] and ckpt["head_towers"] == [0, 0]
    assert not any("teacher" in k for k in ckpt["model"])
    # a one-tower model: every export format, state_dict included, passes its self-check
    meta = export(step_dir / "checkpoint.pt", "state_dict", tmp_path / "merged.pt")
    assert meta["category_ids"] == [1, 2, 4, 5, 7, 9, 11] and (tmp_path / "merged.pt").is_file()
    # the next incremental step starts from it
    nxt = tmp_path / "next.yaml"
    nxt.write_text(f"_base_: {step_dir / 'config.yaml'}\nsplit: [[1, 2, 4, 5], [7, 9, 11], "
                   "[14, 16, 18]]\ntrain: {max_iters: 2}\n")
    m2 = run_step(load_config(nxt), 2, tmp_path / "m", progress=False)
    assert m2["classes"] == {"old": [1, 2, 4, 5, 7, 9, 11], "new": [14, 16, 18]}
    assert load_checkpoint(tmp_path / "m" / "step_2" / "checkpoint.pt")["head_layout"] == \
        [4, 3, 3]


def test_student_starts_from_the_first_teacher_where_the_layout_matches(teachers):
    tmp, cfg_a = teachers
    first = load_teacher(tmp / "a" / "step_0")
    merged = union_classes([(first.source, first.ids, first.names, first.steps), B[:1] +
                            ((14, 16), {14: "crescent", 16: "arrow"}, [(14, 16)])])
    cfg = copy.deepcopy(first.cfg)
    student, copied, total = build_student(cfg, merged, first)
    own = student.state_dict()
    key = "head.classification_head.classifiers.0.weight"
    assert torch.equal(own[key], first.ckpt["model"][key])
    # the second teacher's classes start at the focal-loss prior, as a new step's do
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    assert torch.allclose(own["head.classification_head.classifiers.1.bias"], prior)
    assert copied == total - 2  # all but classifier 1's weight and bias


def test_pure_distillation_from_an_image_folder_and_the_cli(teachers, tmp_path, capsys):
    tmp, _ = teachers
    folder = load_config(tmp / "a" / "step_0" / "config.yaml")["data"]["root"]
    code = merge_main(["--teacher", str(tmp / "a" / "step_0"), "--teacher",
                       str(tmp / "b" / "step_0"), "--images", f"{folder}/images/val",
                       "--work-dir", str(tmp_path / "m"), "--set", "merge.iters=2",
                       "--no-progress"])
    assert code == 0 and "merged step 1 written" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m" / "step_1" / "metrics.json").read_text())
    assert metrics["merge"]["transfer"] == {"images": f"{folder}/images/val", "labels": False}
    assert metrics["train"]["iterations"] == 2


def test_a_collision_writes_nothing(teachers, tmp_path):
    tmp, _ = teachers
    with pytest.raises(UserError, match="--overlap"):
        merge([tmp / "a" / "step_0", tmp / "a" / "step_0"], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_benchmark_markdown_gives_the_merge_figures_against_their_goals():
    from incdet.bench.markdown import markdown

    two = {"a_ap": 0.4, "b_ap": 0.3, "all_ap": 0.35, "a_over_teacher_a": 0.8,
           "b_over_teacher_b": 0.75, "all_over_incdet_without_memory": 1.25}
    r = {"consolidation": {"branch_ap": 0.5, "merged_ap": 0.45, "ratio": 0.9,
                           "branch_images_per_second": 10.0, "merged_images_per_second": 15.0},
         "merge_two": {"with_labels": two},
         "compression": {"teacher_ap": 0.6, "distilled_ap": 0.48, "labels_only_ap": 0.4,
                         "distilled_over_labels_only": 1.2, "distilled_over_teacher": 0.8,
                         "teacher_images_per_second": 10.0, "student_images_per_second": 30.0,
                         "speedup": 3.0},
         "incdet_without_memory_ap": 0.28,
         "branch_from_fpn": {"new_ap": 0.3, "incdet_new_ap": 0.4, "new_over_incdet": 0.75,
                             "tower_new_over_incdet": 0.5, "images_per_second": 8.0,
                             "tower_images_per_second": 10.0}}
    text = markdown({"results": {"merge": r}})
    assert "| 0.450 / 0.500 = 0.90; images/s 15.0 vs 10.0 | ≥ 0.97 |" in text
    assert "(with labels), A / teacher A, B / teacher B | 0.80, 0.75 | ≥ 0.95 each |" in text
    assert "0.350 / 0.280 = 1.25 | > 1 |" in text
    assert "0.480 / 0.400 = 1.20 | ≥ 1.05 |" in text and "30.0 / 10.0 = 3.00 | ≥ 2 |" in text
    assert "(tower: 0.50) | 0.300 / 0.400 = 0.75; images/s 8.0 (tower 10.0) | ≥ 0.7 |" in text


@pytest.mark.parametrize("branch_from", ["fpn", "backbone"])
def test_a_branch_model_with_its_own_fpn_consolidates_into_one_tower(teachers, tmp_path,
                                                                     branch_from):
    """A branch step on its own FPN copy (two FPNs, two towers; with ``backbone`` two bodies
    too) merged alone into one stock RetinaNet: the student starts from its shared parts, has
    one body, one FPN and one tower, and exports as a plain torchvision state dict (which the
    branch model cannot)."""
    tmp, cfg_a = teachers
    work = tmp_path / "w"
    shutil.copytree(tmp / "a" / "step_0", work / "step_0")
    cfg = load_config(cfg_a, ["incremental.method=branch",
                              f"incremental.branch_from={branch_from}"])
    run_step(cfg, 1, work, progress=False)
    branched = load_checkpoint(work / "step_1" / "checkpoint.pt")
    assert branched["head_fpns"] == [0, 1]
    assert branched["fpn_bodies"] == [0, 1 if branch_from == "backbone" else 0]
    merged_cfg = load_config(cfg_a, ["merge.iters=2", "merge.transfer_step=1"])
    metrics = merge([work / "step_1"], tmp_path / "m", merged_cfg, progress=False)
    assert metrics["merge"]["answers"] == [[1, 2, 4, 5, 7, 9, 11]]
    ckpt = load_checkpoint(tmp_path / "m" / "step_1" / "checkpoint.pt")
    assert ckpt["head_towers"] == [0, 0] and ckpt["head_fpns"] == [0]
    assert ckpt["fpn_bodies"] == [0]
    assert not any("_branches" in k or "classification_head.branches" in k
                   for k in ckpt["model"])
    meta = export(tmp_path / "m" / "step_1" / "checkpoint.pt", "state_dict", tmp_path / "s.pt")
    assert meta["category_ids"] == [1, 2, 4, 5, 7, 9, 11]
