"""Distillation from the frozen previous model (the teacher) into the grown student.

``L = L_focal + L_box + sum_f w_cls * L_D^cls_f + w_box * L_D^box``: one classification
distillation term per earlier step ``f`` (over the classes step ``f`` added, as the
cross-distilled loss of End-to-End Incremental Learning has one per old classifier) and one
distillation of the box regression deltas. Both are taken on the anchors selected by
:func:`select_anchors` (ERD's rule by default: the anchors on which the teacher is confident).

Forms of the classification term (``incremental.cls_distill``):

* ``sigmoid_kd`` (default): Hinton-style soft targets for a sigmoid classifier. With temperature
  T, teacher probability ``p = sigmoid(z_t / T)`` and student ``q = sigmoid(z_s / T)`` per class,
  the loss is the Bernoulli KL divergence ``KL(p || q) * T**2`` (zero iff ``q == p``).
* ``l2``: squared difference of the raw logits (Shmelkov et al. 2017, ERD).

The teacher is frozen, in ``eval()`` mode, run under ``torch.no_grad()``; it is held in a plain
attribute of this criterion, never registered in the student, so it is never in a checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from incdet.base.errors import check_choice
from incdet.data.classes import ClassSpace, StepClasses
from incdet.model.builder import forward_train
from incdet.train.losses import DetectionLoss, match_anchors

ANCHOR_RULES = ("erd", "topk", "all")
LABELLED_ANCHORS = ("labels", "teacher")
CLS_FORMS = ("sigmoid_kd", "l2")
BOX_FORMS = ("l2", "smooth_l1", "none")


def select_anchors(teacher_logits: torch.Tensor, rule: str = "erd", topk: int = 100,
                   std_factor: float = 2.0) -> torch.Tensor:
    """(N, HWA, K_old) teacher logits -> (N, HWA) bool mask of anchors to distil.

    ``erd``: anchors whose max old-class score exceeds mean + ``std_factor`` * std of that
    image's max scores; ``topk``: the ``topk`` highest max scores per image; ``all``: every anchor.
    """
    check_choice("incremental.anchors", rule, ANCHOR_RULES)
    if rule == "all":
        return torch.ones(teacher_logits.shape[:2], dtype=torch.bool, device=teacher_logits.device)
    return select_by_scores(teacher_logits.sigmoid().amax(dim=2), rule, topk, std_factor)


def select_by_scores(scores: torch.Tensor, rule: str = "erd", topk: int = 100,
                     std_factor: float = 2.0) -> torch.Tensor:
    """:func:`select_anchors` from (N, HWA) scores: each anchor's highest teacher probability."""
    if rule == "all":
        return torch.ones_like(scores, dtype=torch.bool)
    if rule == "erd":
        thr = scores.mean(dim=1, keepdim=True) + std_factor * scores.std(dim=1, keepdim=True)
        return scores > thr
    k = min(int(topk), scores.shape[1])
    idx = scores.topk(k, dim=1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def cls_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mask: torch.Tensor, form: str = "sigmoid_kd",
                     temperature: float = 2.0) -> torch.Tensor:
    """Distillation of (N, HWA, K_f) logits on the anchors in ``mask`` (an (N, HWA) bool mask,
    or its ``nonzero(as_tuple=True)``, which indexes without a synchronisation): summed over
    the K_f classes, averaged over the selected anchors (0 when no anchor is selected), so that
    a group's term does not shrink as the number of its classes grows."""
    check_choice("incremental.cls_distill", form, CLS_FORMS)
    s, t = student_logits[mask], teacher_logits[mask]  # (M, K_f)
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    if form == "l2":
        return (s - t).pow(2).sum(1).mean()
    p = torch.sigmoid(t / temperature)
    # KL(p || q) for Bernoulli variables = BCE(q_logits, p) - H(p)
    kl = F.binary_cross_entropy_with_logits(s / temperature, p, reduction="none") \
        - F.binary_cross_entropy_with_logits(t / temperature, p, reduction="none")
    return kl.sum(1).mean() * temperature ** 2


def box_distillation(student_deltas: torch.Tensor, teacher_deltas: torch.Tensor,
                     mask: torch.Tensor, form: str = "l2") -> torch.Tensor:
    """Distillation of (N, HWA, 4) box deltas on the anchors in ``mask`` (as for
    :func:`cls_distillation`; summed over the four deltas, averaged over anchors)."""
    check_choice("incremental.box_distill", form, BOX_FORMS)
    s, t = student_deltas[mask], teacher_deltas[mask]
    if form == "none" or s.numel() == 0:
        return student_deltas.sum() * 0.0
    if form == "l2":
        return (s - t).pow(2).sum(1).mean()
    return F.smooth_l1_loss(s, t, beta=1.0 / 9, reduction="none").sum(1).mean()


def pseudo_labels(teacher, head_outputs: dict, anchors: list[torch.Tensor], image_sizes,
                  targets: list[dict], score_thresh: float, iou_thresh: float = 0.5) -> list[dict]:
    """Targets extended by the teacher's old-class detections scoring above ``score_thresh``
    that do not overlap a ground-truth box (IoU < ``iou_thresh``)."""
    # the teacher's postprocess expects outputs split per level; one level works as well
    split = {k: [v] for k, v in head_outputs.items()}
    split_anchors = [[a] for a in anchors]
    old_thresh, teacher.score_thresh = teacher.score_thresh, score_thresh
    try:
        detections = teacher.postprocess_detections(split, split_anchors, image_sizes)
    finally:
        teacher.score_thresh = old_thresh
    out = []
    for t, det in zip(targets, detections):
        boxes, labels = det["boxes"], det["labels"]
        if t["boxes"].numel() and boxes.numel():
            keep = box_iou(boxes, t["boxes"]).amax(dim=1) < iou_thresh
            boxes, labels = boxes[keep], labels[keep]
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        new = dict(t)
        new["boxes"] = torch.cat([t["boxes"], boxes[keep]])
        new["labels"] = torch.cat([t["labels"], labels[keep]])
        out.append(new)
    return out


class DistillationCriterion:
    """``incdet``'s loss for a step t >= 1: detection loss on the step's annotations (masked to
    each image's label space) plus distillation from the teacher.

    Returns ``{"loss_cls", "loss_box", "loss_distill_cls_<f>" for each earlier step f,
    "loss_distill_box"}``.
    """

    def __init__(self, cfg: dict, student, teacher, detection: DetectionLoss,
                 classes: ClassSpace, sc: StepClasses, include_new: bool = False):
        self._forward_train = forward_train
        self.student = student
        self.teacher = teacher  # plain attribute: never a submodule of the student
        self.detection = detection
        icfg = cfg["incremental"]
        self.icfg = icfg
        # label index ranges of each distilled step in the teacher's output: the earlier steps,
        # or every step (balanced fine-tuning distils from a teacher that knows the new classes)
        self.group_slices, start = [], 0
        for g in (sc.groups if include_new else sc.groups[:-1]):
            self.group_slices.append(slice(start, start + len(g)))
            start += len(g)
        self.num_old = start
        for key, allowed in (("anchors", ANCHOR_RULES), ("cls_distill", CLS_FORMS),
                             ("box_distill", BOX_FORMS)):
            check_choice(f"incremental.{key}", icfg[key], allowed)
        # incremental.labelled_anchors: labels (see labels_decide) makes the detection loss treat
        # an anchor matched to an annotated box as a negative of every other class; such an
        # anchor is then not distilled. The detection loss carries the one decision.
        self.labels_decide = detection.objects_negative_for_all

    @staticmethod
    def labels_decide_for(cfg: dict) -> bool:
        """``incremental.labelled_anchors``, checked: True for ``labels`` (an anchor matched to an
        annotated box is what its label says), False for ``teacher`` (the loss covers the
        image's label space only and the teacher is distilled there too)."""
        value = cfg["incremental"]["labelled_anchors"]
        check_choice("incremental.labelled_anchors", value, LABELLED_ANCHORS)
        return value == "labels"

    @torch.no_grad()
    def teacher_outputs(self, image_list) -> dict:
        if self.teacher.training:  # eval() walks every module: not at every iteration
            self.teacher.eval()
        features = list(self.teacher.backbone(image_list.tensors).values())
        return self.teacher.head(features)

    def __call__(self, images, targets) -> dict[str, torch.Tensor]:
        head_outputs, anchors, targets_t, image_list = self._forward_train(
            self.student, images, targets)
        t_out = self.teacher_outputs(image_list)
        t_logits = t_out["cls_logits"][:, :, :self.num_old]  # (N, HWA, K_old)
        if self.icfg["pseudo_labels"]:
            targets_t = pseudo_labels(self.teacher, t_out, anchors, image_list.image_sizes,
                                      targets_t, float(self.icfg["pseudo_thresh"]))
        matched = match_anchors(self.detection.matcher, anchors, targets_t) \
            if self.labels_decide else None  # else the detection loss matches them itself
        losses = self.detection(head_outputs, anchors, targets_t, matched)
        mask = select_anchors(t_logits, self.icfg["anchors"], int(self.icfg["topk"]))
        if matched is not None:
            mask = mask & (matched < 0)
        # the selected anchors' indices, found once (one host synchronisation) for every term
        where = mask.nonzero(as_tuple=True)
        s_logits = head_outputs["cls_logits"]
        for f, sl in enumerate(self.group_slices):
            losses[f"loss_distill_cls_{f}"] = cls_distillation(
                s_logits[:, :, sl], t_logits[:, :, sl], where, self.icfg["cls_distill"],
                float(self.icfg["temperature"]))
        losses["loss_distill_box"] = box_distillation(
            head_outputs["bbox_regression"], t_out["bbox_regression"], where,
            self.icfg["box_distill"])
        return losses
