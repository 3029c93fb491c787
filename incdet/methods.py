"""What differs between the incremental methods, and nothing else.

* ``incdet``: the student is the previous model with its head grown by the new classes; the
  focal loss is masked to each image's label space (the new classes) and a frozen teacher (the
  previous model) distils old-class logits and box deltas (:mod:`incdet.distill`).
* ``finetune``: the same grown student, plain focal loss over every seen class (unlabelled old
  objects become background), no teacher: the lower bound.
* ``joint``: a fresh model trained on every seen class's annotations: the upper bound.

At step 0 all three train the same model on the step's classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from incdet import distributed as dist
from incdet.checkpoint import load_model_state
from incdet.classes import ClassSpace, StepClasses
from incdet.data.sampler import replay_counts
from incdet.errors import UserError, check_choice
from incdet.model.builder import build_model

METHODS = ("incdet", "finetune", "joint")


@dataclass(frozen=True)
class Plan:
    """Which annotations a step trains on and which label indices they are annotated for."""

    train_classes: tuple[int, ...]  # category ids whose boxes are kept
    label_space: tuple[int, ...]  # label indices given background targets
    uses_previous: bool  # starts from the previous step's model
    uses_teacher: bool
    uses_memory: bool = False


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
    return Plan(sc.new, new_labels, uses_previous=True, uses_teacher=True, uses_memory=memory)


def build_student(cfg: dict, sc: StepClasses, plan: Plan, previous: dict | None,
                  source: str = "previous checkpoint"):
    """The model to train at this step (on CPU; the caller moves it). ``source`` names
    ``previous`` in errors."""
    layout = [len(g) for g in sc.groups]
    if not plan.uses_previous:
        return build_model(cfg["model"], layout)
    if previous is None:
        raise UserError(f"step {sc.step}: the previous step's checkpoint is required")
    model = build_model(cfg["model"], previous["head_layout"])
    load_model_state(model, previous, cfg["model"], source)
    model.head.classification_head.grow(len(sc.new))
    return model


def build_teacher(cfg: dict, previous: dict, source: str = "previous checkpoint"):
    """The frozen previous model: ``eval()``, no gradients, not a submodule of the student."""
    teacher = build_model(cfg["model"], previous["head_layout"])
    load_model_state(teacher, previous, cfg["model"], source)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


REPLAY_LOSSES = ("pooled", "separate")


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
    from incdet.losses import DetectionLoss
    from incdet.model.builder import forward_train

    detection = DetectionLoss(cfg["loss"], student.box_coder, student.proposal_matcher,
                              replay_weight(cfg) if plan.uses_memory and sc.step > 0 else None)
    if teacher is None:
        def loss_fn(images, targets):
            head_outputs, anchors, targets_t, _ = forward_train(student, images, targets)
            return detection(head_outputs, anchors, targets_t)
        return loss_fn
    from incdet.distill import DistillationCriterion

    return DistillationCriterion(cfg, student, teacher, detection, classes, sc,
                                 include_new=distill_new)
