"""What differs between the incremental methods, and nothing else.

* ``incdet``: the student is the previous model with its head grown by the new classes; the
  focal loss is masked to each image's label space (the new classes) and a frozen teacher (the
  previous model) distils old-class logits and box deltas (:mod:`incdet.train.distill`).
* ``finetune``: the same grown student, plain focal loss over every seen class (unlabelled old
  objects become background), no teacher: the lower bound.
* ``joint``: a fresh model trained on every seen class's annotations: the upper bound. At step
  ``t`` it trains for as many iterations as the incremental run has spent on steps ``0..t``
  together (equal compute; :func:`training_budget`), with the same recipe, its schedule
  stretched over the longer run. ``incremental.joint_budget: step`` gives it one step's budget
  instead (a weaker reference, never the default denominator of a ratio).
* ``branch``: the new classes get a classification tower of their own (a copy of the latest
  tower) and a classifier; everything the earlier steps trained (backbone, FPN, box subnet,
  earlier towers and classifiers, norm statistics) is frozen, so old-class logits are
  bit-identical to the previous model's on every input. The focal loss is masked to the new
  classes; no teacher, no memory, no old data. With ``model.caps_per_step`` (on by default for
  ``branch``) old detections, and so old-class AP, stay exactly as they were. With
  ``incremental.branch_from: fpn`` the new tower also reads a trainable copy of the latest FPN
  (P3-P7 from the frozen backbone's features): the new classes get more to learn with; the old
  towers still read the frozen FPN, so old outputs stay bit-identical, and inference pays one
  FPN and one tower per such step. With ``branch_from: backbone`` that FPN also reads a
  trainable copy of the latest backbone body: the new classes learn with a whole network of
  their own (as a detector trained apart from the previous one's weights would), old outputs
  stay bit-identical, and inference pays a whole network per step: ``tools/merge.py``
  consolidates the result into one network (design.md, "Merging and compressing detectors").

At step 0 all three train the same model on the step's classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from incdet.base import distributed as dist
from incdet.base.errors import UserError, check_choice
from incdet.data.classes import ClassSpace, StepClasses
from incdet.data.disjoint import training_records
from incdet.data.sampler import replay_counts
from incdet.model.builder import (
    build_model,
    caps_per_step,
    forward_train,
    freeze_all_but,
    grow_model,
)
from incdet.model.checkpoint import model_of
from incdet.train.distill import DistillationCriterion
from incdet.train.losses import DetectionLoss

METHODS = ("incdet", "finetune", "joint", "branch")


@dataclass(frozen=True)
class Plan:
    """Which annotations a step trains on and which label indices they are annotated for."""

    train_classes: tuple[int, ...]  # category ids whose boxes are kept
    label_space: tuple[int, ...]  # label indices given background targets
    uses_previous: bool  # starts from the previous step's model
    uses_teacher: bool
    uses_memory: bool = False


JOINT_BUDGETS = ("equal", "step")


def step_iterations(cfg: dict, num_images: int, num_classes: int) -> int:
    """One step's budget: ``train.iters_per_class`` times the ``num_classes`` it adds, else
    ``train.max_iters``, else ``train.epochs`` over ``num_images`` images in full batches of
    ``train.batch_size``."""
    tcfg = cfg["train"]
    per_class = tcfg.get("iters_per_class")
    if per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise UserError(f"train.iters_per_class: {per_class!r} is not a positive integer; "
                            "give iterations per class (e.g. 290) or null")
        return per_class * num_classes
    if tcfg.get("max_iters"):
        return int(tcfg["max_iters"])
    bs = int(tcfg["batch_size"])
    return int(tcfg["epochs"]) * max(1, num_images // bs if num_images > bs else 1)


def training_budget(cfg: dict, classes: ClassSpace, records, t: int, batches: int) -> int:
    """Iterations of step ``t``: its own budget (``train.iters_per_class`` times its new
    classes, ``train.max_iters``, or ``train.epochs`` of ``batches``); for ``joint`` with
    ``incremental.joint_budget: equal`` (the default) the sum of the budgets of steps ``0..t``
    of the incremental run (each step's budget counted over its new classes and new-class
    images, as the incremental steps train), so that the upper bound has the same compute."""
    tcfg = cfg["train"]
    rule = cfg["incremental"].get("joint_budget", "equal")
    check_choice("incremental.joint_budget", rule, JOINT_BUDGETS)
    if cfg["incremental"]["method"] != "joint" or t == 0 or rule == "step":
        if tcfg.get("iters_per_class") is None and not tcfg.get("max_iters"):
            return int(tcfg["epochs"]) * batches
        return step_iterations(cfg, 0, len(classes.steps[t]))
    return incremental_iterations(cfg, classes, records, t)


def incremental_iterations(cfg: dict, classes: ClassSpace, records, t: int) -> int:
    """The iterations an incremental run spends on steps ``0..t`` together (each step's images
    counted as it trains on them: with ``data.disjoint_steps``, only those it owns)."""
    disjoint = cfg["data"]["disjoint_steps"]
    return sum(step_iterations(cfg, len(training_records(records, classes.steps,
                                                         classes.steps[s], disjoint)),
                               len(classes.steps[s])) for s in range(t + 1))


def memory_enabled(cfg: dict) -> bool:
    m = cfg["memory"]
    return bool(m.get("budget")) or bool(m.get("per_class"))


def plan_step(method: str, classes: ClassSpace, sc: StepClasses, memory: bool = False) -> Plan:
    """``memory``: whether the exemplar memory is on (it serves ``incdet`` only)."""
    check_choice("incremental.method", method, METHODS)
    new_labels = tuple(classes.labels(sc.new))
    seen_labels = tuple(classes.labels(sc.seen))
    if sc.step == 0 or method == "joint":
        # incdet's step 0 selects the memory that step 1 replays
        return Plan(sc.seen, seen_labels, uses_previous=False, uses_teacher=False,
                    uses_memory=memory and method == "incdet")
    if method == "finetune":
        return Plan(sc.new, seen_labels, uses_previous=True, uses_teacher=False)
    if method == "branch":
        return Plan(sc.new, new_labels, uses_previous=True, uses_teacher=False)
    return Plan(sc.new, new_labels, uses_previous=True, uses_teacher=True, uses_memory=memory)


def optimizer_settings(cfg: dict, plan: Plan) -> dict:
    """The ``train`` settings a step's optimizer is built with: a step that goes on from the
    previous model (``incdet``, ``finetune``, ``branch`` at t >= 1) trains at ``train.lr *
    incremental.lr_scale``; step 0 and ``joint`` (a fresh model) at ``train.lr``."""
    tcfg = cfg["train"]
    scale = float(cfg["incremental"]["lr_scale"])
    if not scale > 0:
        raise UserError(f"incremental.lr_scale: {scale} must be above 0")
    return dict(tcfg, lr=tcfg["lr"] * scale) if plan.uses_previous else tcfg


def build_student(cfg: dict, sc: StepClasses, plan: Plan, previous: dict | None,
                  source: str = "previous checkpoint"):
    """The model to train at this step (on CPU; the caller moves it). ``source`` names
    ``previous`` in errors."""
    layout = [len(g) for g in sc.groups]
    if not plan.uses_previous:
        return build_model(cfg["model"], layout, per_step_caps=caps_per_step(cfg))
    if previous is None:
        raise UserError(f"step {sc.step}: the previous step's checkpoint is required")
    model = model_of(cfg, previous, source)
    branch = cfg["incremental"]["method"] == "branch"
    branch_from = cfg["incremental"].get("branch_from", "tower")
    check_choice("incremental.branch_from", branch_from, BRANCH_FROM)
    new_fpn = branch and branch_from in ("fpn", "backbone")
    new_body = branch and branch_from == "backbone"
    grow_model(model, len(sc.new), new_tower=branch, new_fpn=new_fpn, new_body=new_body)
    if branch:
        head = model.head.classification_head
        own = [head.towers()[-1], head.classifiers[-1]]
        if new_fpn:
            own.append(model.backbone.fpn_branches[-1])
        if new_body:
            own.append(model.backbone.body_branches[-1])
        freeze_all_but(model, own)
    return model


def build_teacher(cfg: dict, previous: dict, source: str = "previous checkpoint"):
    """The frozen previous model: ``eval()``, no gradients, not a submodule of the student."""
    teacher = model_of(cfg, previous, source)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


REPLAY_LOSSES = ("pooled", "separate")
BRANCH_FROM = ("tower", "fpn", "backbone")


def replay_weight(cfg: dict) -> float | None:
    """``memory.replay_loss``: None for ``pooled``; for ``separate`` the weight of the replayed
    images' loss, their number per batch over the new images' number, so that per image the two
    count about the same as when pooled."""
    mcfg = cfg["memory"]
    check_choice("memory.replay_loss", mcfg["replay_loss"], REPLAY_LOSSES)
    if mcfg["replay_loss"] == "pooled":
        return None
    new, memory = replay_counts(int(cfg["train"]["batch_size"]) * dist.world_size(),
                                float(mcfg["replay_fraction"]), mcfg["replay_mode"])
    return memory / new


def make_criterion(cfg: dict, student, teacher, plan: Plan, classes: ClassSpace,
                   sc: StepClasses, distill_new: bool = False):
    """``loss_fn(images, targets) -> {"loss_*": Tensor}`` for the step's method."""
    # incremental.labelled_anchors; without a teacher only the labels train anyway
    labels_decide = teacher is not None and DistillationCriterion.labels_decide_for(cfg)
    detection = DetectionLoss(cfg["loss"], student.box_coder, student.proposal_matcher,
                              replay_weight(cfg) if plan.uses_memory and sc.step > 0 else None,
                              objects_negative_for_all=labels_decide)
    if teacher is None:
        def loss_fn(images, targets):
            head_outputs, anchors, targets_t, _ = forward_train(student, images, targets)
            return detection(head_outputs, anchors, targets_t)
        return loss_fn

    return DistillationCriterion(cfg, student, teacher, detection, classes, sc,
                                 include_new=distill_new)
