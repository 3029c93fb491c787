"""Benchmark section merge: one model out of several, and a small one out of a big one.

On a 5 + 5 split of the built-in data (``configs/shapes_2step.yaml``), at one budget for every
run (``iters_per_class`` per class a step adds; every merge trains for one step's budget):

1. a protocol run: ``branch`` (5 + 5), ``branch`` with ``branch_from: fpn`` and with
   ``branch_from: backbone``, ``incdet_no_memory`` (``incdet`` without memory), and the
   equal-compute ``joint`` on all 10 classes, from one shared step 0 (classes A);
2. teacher B: a detector trained apart, on the images of classes B alone (their boxes only);
3. **consolidation**: the ``branch`` model merged into one stock RetinaNet using only step 1's
   images (their B boxes); the same for the ``branch_from: backbone`` model;
4. **merging** teacher A (the step-0 detector) and teacher B using only B's images, with their
   B boxes, and again with every box removed (pure distillation);
5. **compression**: the ``joint`` model (10 classes) into a smaller student (``STUDENT``; with
   ImageNet weights, ``STUDENT_PRETRAINED``: the same backbone and weights) on the
   training images, for as many iterations as the teacher was trained (the joint step, from
   scratch), against the same student trained on the labels alone for as many iterations;
6. images/s at inference of the models compared, measured side by side (rounds alternate).

``branch_from: fpn``'s and ``backbone``'s new-class AP is compared with ``incdet``'s (goal:
>= 0.7 x), their old classes with step 0's (the same detections, so the same AP).

Every folder is kept under the output folder; a rerun skips what is complete.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from incdet.base.config import apply_overrides
from incdet.base.devices import seed_everything
from incdet.bench.inference import alternating_images_per_second
from incdet.data.dataset import read_image, to_tensor
from incdet.deploy.detector import load_detector
from incdet.experiment.loaders import load_experiment
from incdet.experiment.merge import merge
from incdet.experiment.protocol import run_protocol
from incdet.experiment.step import run_step

# the compressed student: a shallower backbone (mobilenet_v3_small: 11 blocks, not 15; at 128 px
# on CPU the cost follows the number of layers more than their width), a narrower FPN, one conv
# per head tower
STUDENT = ["model.backbone=mobilenet_v3_small", "model.fpn_channels=32", "model.head_convs=1"]
# the pretrained regime's student keeps the teacher's ImageNet backbone (the one file of weights
# to be had: torchvision's MobileNetV2) and is smaller in the layers trained from scratch
STUDENT_PRETRAINED = ["model.fpn_channels=32", "model.head_convs=1"]
VARIANTS = {"branch": ["incremental.method=branch", "memory.budget=0"],
            "branch_fpn": ["incremental.method=branch", "incremental.branch_from=fpn",
                           "memory.budget=0"],
            "branch_backbone": ["incremental.method=branch", "incremental.branch_from=backbone",
                                "memory.budget=0"],
            "incdet_no_memory": ["incremental.method=incdet", "memory.budget=0"],
            "joint": ["incremental.method=joint", "memory.budget=0"]}


def _merged(teachers, work_dir: Path, cfg: dict, progress: bool) -> dict:
    """The metrics of a merge, run unless ``work_dir`` already holds its result."""
    done = sorted(work_dir.glob("step_*/metrics.json")) if work_dir.is_dir() else []
    if done:
        return json.loads(done[-1].read_text())
    return merge(teachers, work_dir, cfg, progress=progress)


def images_per_second(checkpoints: dict[str, Path], records, rounds: int = 3) -> dict:
    """Inference images/s of each checkpoint (as :func:`load_detector` gives it, on CPU, one image
    per call) on ``records``; rounds alternate between the models, the best round counts."""
    models = {k: load_detector(p, "cpu") for k, p in checkpoints.items()}
    images = [to_tensor(read_image(r.path)) for r in records]
    runners = {k: (lambda x, m=m: m([x])) for k, m in models.items()}
    return alternating_images_per_second(runners, images, rounds, warmup=1)


def merge_benchmark(cfg: dict, work_dir: str | Path, progress: bool = True,
                    speed_images: int = 64) -> dict:
    """Run the section (module docstring) on ``cfg`` (a two-step split); returns its figures."""
    work = Path(work_dir)
    seed_everything(int(cfg["train"]["seed"]))
    runs = run_protocol(cfg, work / "protocol", VARIANTS, progress, joint_last_only=True)
    _, val_set, classes = load_experiment(cfg, progress)
    a_ids, b_ids = list(classes.steps[0]), list(classes.steps[1])
    step_iters = int(runs["branch"][1]["train"]["iterations"])

    # teacher B: trained apart, on B's images and boxes alone, for one step's budget
    cfg_b = copy.deepcopy(cfg)
    cfg_b["split"] = [b_ids]
    apply_overrides(cfg_b, ["incremental.method=incdet", "memory.budget=0",
                            f"train.max_iters={step_iters}", "train.iters_per_class=null"])
    teacher_b = run_step(cfg_b, 0, work / "teacher_b", progress=progress)

    merge_cfg = copy.deepcopy(cfg)
    apply_overrides(merge_cfg, [f"merge.iters={step_iters}", "merge.transfer_step=1",
                                "memory.budget=0"])
    protocol = work / "protocol"
    consolidated = _merged([protocol / "branch" / "step_1"], work / "consolidated", merge_cfg,
                           progress)
    consolidated_bb = _merged([protocol / "branch_backbone" / "step_1"],
                              work / "consolidated_backbone", merge_cfg, progress)
    teacher_a = protocol / "incdet_no_memory" / "step_0"
    merged_ab = _merged([teacher_a, work / "teacher_b" / "step_0"], work / "merged_ab",
                        merge_cfg, progress)
    pure_cfg = copy.deepcopy(merge_cfg)
    apply_overrides(pure_cfg, ["merge.labels=false"])
    merged_pure = _merged([teacher_a, work / "teacher_b" / "step_0"], work / "merged_ab_pure",
                          pure_cfg, progress)

    # compression: the joint model into a smaller student, distilled vs labels alone, each for
    # as many iterations as the teacher had (joint trains its last step from scratch)
    teacher_iters = int(runs["joint"][-1]["train"]["iterations"])
    small = copy.deepcopy(cfg)
    student = STUDENT_PRETRAINED if cfg["model"].get("weights") else STUDENT
    apply_overrides(small, student + ["memory.budget=0", "incremental.method=incdet"])
    distil_cfg = copy.deepcopy(small)
    apply_overrides(distil_cfg, [f"merge.iters={teacher_iters}", "merge.transfer_step=null"])
    compressed = _merged([protocol / "joint" / "step_1"], work / "compressed", distil_cfg,
                         progress)
    labels_cfg = copy.deepcopy(small)
    labels_cfg["split"] = [list(classes.order)]
    apply_overrides(labels_cfg, [f"train.max_iters={teacher_iters}",
                                 "train.iters_per_class=null"])
    labels_only = run_step(labels_cfg, 0, work / "small_labels_only", progress=progress)

    speed_records = val_set.records[:speed_images]
    speed = images_per_second({
        "branch": protocol / "branch" / "step_1" / "checkpoint.pt",
        "branch_fpn": protocol / "branch_fpn" / "step_1" / "checkpoint.pt",
        "branch_backbone": protocol / "branch_backbone" / "step_1" / "checkpoint.pt",
        "consolidated": next((work / "consolidated").glob("step_*/checkpoint.pt")),
        "joint": protocol / "joint" / "step_1" / "checkpoint.pt",
        "compressed": next((work / "compressed").glob("step_*/checkpoint.pt")),
    }, speed_records)

    def ap(m: dict, group: str = "all") -> float | None:
        return m["map"][group]["AP"]

    def class_ap(m: dict, ids) -> float | None:
        vals = [m["per_class_ap"].get(str(c)) for c in ids]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    branch, incdet, joint = runs["branch"][1], runs["incdet_no_memory"][1], runs["joint"][-1]
    step0 = runs["incdet_no_memory"][0]
    out = {
        "step_iters": step_iters,
        "consolidation": {
            "branch_ap": ap(branch), "merged_ap": ap(consolidated),
            "ratio": ap(consolidated) / ap(branch),
            "branch_images_per_second": speed["branch"],
            "merged_images_per_second": speed["consolidated"],
        },
        "merge_two": {},
        "compression": {
            "teacher_ap": ap(joint), "distilled_ap": ap(compressed),
            "labels_only_ap": ap(labels_only),
            "distilled_over_labels_only": ap(compressed) / ap(labels_only),
            "distilled_over_teacher": ap(compressed) / ap(joint),
            "teacher_images_per_second": speed["joint"],
            "student_images_per_second": speed["compressed"],
            "speedup": speed["compressed"] / speed["joint"],
            "student": student, "iterations": teacher_iters,
        },
        "consolidation_backbone": {
            "branch_ap": ap(runs["branch_backbone"][1]), "merged_ap": ap(consolidated_bb),
            "ratio": ap(consolidated_bb) / ap(runs["branch_backbone"][1]),
            "branch_images_per_second": speed["branch_backbone"],
            "merged_images_per_second": speed["consolidated"],
            "all_over_incdet_without_memory": ap(consolidated_bb) / ap(incdet),
        },
        "incdet_without_memory_ap": ap(incdet),
        "teachers": {"a_ap": ap(step0, "new"), "b_ap": ap(teacher_b, "new")},
    }
    for kind in ("fpn", "backbone"):
        m = runs[f"branch_{kind}"][1]
        out[f"branch_from_{kind}"] = {
            "new_ap": ap(m, "new"), "old_ap": ap(m, "old"),
            "tower_new_ap": ap(branch, "new"), "tower_old_ap": ap(branch, "old"),
            "incdet_new_ap": ap(incdet, "new"), "step0_ap": ap(step0, "new"),
            "new_over_incdet": ap(m, "new") / ap(incdet, "new"),
            "tower_new_over_incdet": ap(branch, "new") / ap(incdet, "new"),
            "images_per_second": speed[f"branch_{kind}"],
            "tower_images_per_second": speed["branch"]}
    for name, m in (("with_labels", merged_ab), ("pure_distillation", merged_pure)):
        a_ap, b_ap = class_ap(m, a_ids), class_ap(m, b_ids)
        out["merge_two"][name] = {
            "a_ap": a_ap, "b_ap": b_ap, "all_ap": ap(m),
            "a_over_teacher_a": a_ap / ap(step0, "new"),
            "b_over_teacher_b": b_ap / ap(teacher_b, "new"),
            "all_over_incdet_without_memory": ap(m) / ap(incdet)}
    return out
