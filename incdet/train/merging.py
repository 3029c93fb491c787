"""Merging detectors by distillation: several frozen teachers, one student (the loss).

Each teacher answers for its own classes on every anchor of the student; the student learns
all of them at once (Hinton et al.'s specialists distilled into one model; Deep Model
Consolidation, Zhang et al. 2020, for RetinaNet). ``L = w_cls * L_cls_kd + w_box * L_box_kd``
plus the ground-truth focal and box losses where the transfer set has labels (with
``labelled`` classes, ``merge.annotated: labels``, those classes learn from the labels alone: no
teacher answers for them, in either term):

* **Classification** (:func:`soft_focal_distillation`): with temperature ``T``, the target of
  class ``c`` at an anchor is ``p = sigmoid(z_t / T)`` of the teacher that answers for ``c`` (the
  mean of the teachers' ``p`` when several do: ``merge.overlap: mean``) and the student's is
  ``q = sigmoid(z_s / T)``. The loss is the Bernoulli ``KL(p || q) * T**2`` weighted by
  ``|p - q| ** gamma`` and summed over every anchor and class. The weight is the focal loss's
  modulating factor with a soft target (the quality focal loss of Generalized Focal Loss, Li et
  al. 2020): without it the ~10^5 background anchors per image, each nearly right, outweigh the
  few dozen that carry objects, as they would in a plain cross-entropy. The sum is divided by the
  soft number of objects, ``max(1, sum over anchors of max_c sigmoid(z_t))``, as the focal loss
  divides by the number of foreground anchors. It is zero, with a zero gradient, exactly when
  the student's logits equal the targets' (both factors vanish). ``merge.anchors: erd`` keeps
  only the anchors where the teachers are confident (ERD's rule,
  :func:`incdet.train.distill.select_by_scores`, on that highest probability), in the sum and in
  the normalisation.
* **Boxes** (:func:`box_distillation`): at each anchor the teacher most confident there (its
  highest class probability at ``T = 1`` over the classes it answers for) gives the box, if that
  probability is at least ``merge.box_thresh``. The box is decoded in the teacher's image,
  encoded against the student's anchor, and the student's deltas are pulled to it with an L1
  loss weighted by the teacher's confidence (divided by the sum of the weights).

Teachers see the images as they expect them (:func:`teacher_dense`): each runs its own resize
and normalisation, and its outputs are brought onto the student's anchors, level by level, the
student's cell taking the teacher's cell under its centre. Where the teacher's grid is the
student's (same image size after the transform, same FPN levels and anchors per location) this
is the identity, and the teacher's outputs are used as they are.

Teachers are frozen, in ``eval()`` mode, run under ``torch.no_grad()`` once per batch, and are
plain attributes of the criterion (never submodules of the student, never in its checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from incdet.base.errors import check_choice
from incdet.model.builder import batch_anchors, batch_transform, forward_train
from incdet.train.distill import select_by_scores
from incdet.train.losses import DetectionLoss, decode_boxes, encode_boxes


def soft_focal_distillation(student_logits: Tensor, target_prob: Tensor, target_conf: Tensor,
                            temperature: float = 2.0, gamma: float = 2.0,
                            mask: Tensor | None = None) -> Tensor:
    """Classification distillation of (N, M, K) logits towards (N, M, K) target probabilities
    at ``temperature``; ``target_conf`` (N, M): the targets' highest probability at ``T = 1``
    per anchor, whose sum (at least 1) normalises the loss (module docstring). ``mask`` (N, M):
    only these anchors are distilled (and counted in the normalisation); None: every anchor."""
    t = float(temperature)
    p = target_prob.to(student_logits.dtype)
    s = student_logits / t
    q = torch.sigmoid(s)
    # KL(p || q) for Bernoulli variables: BCE(q, p) minus the entropy of p
    kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - _entropy(p)
    weight = (p - q).abs().pow(gamma)
    if mask is not None:
        weight = weight * mask[..., None].to(weight.dtype)
        target_conf = target_conf * mask.to(target_conf.dtype)
    norm = target_conf.sum().clamp(min=1.0)
    return (weight * kl).sum() * t ** 2 / norm


def _entropy(p: Tensor) -> Tensor:
    """Binary entropy, 0 at p = 0 and p = 1."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def box_distillation(student_deltas: Tensor, target_deltas: Tensor, weight: Tensor) -> Tensor:
    """L1 between (N, M, 4) student deltas and target deltas, weighted per anchor by ``weight``
    (N, M) (0: not distilled), divided by the sum of the weights (at least 1)."""
    per_anchor = (student_deltas - target_deltas.to(student_deltas.dtype)).abs().sum(-1)
    return (per_anchor * weight).sum() / weight.sum().clamp(min=1.0)


def _grid_index(t_shape: tuple[int, int], s_shape: tuple[int, int], t_stride: tuple[float, float],
                s_stride: tuple[float, float], scale: tuple[float, float],
                device) -> tuple[Tensor, Tensor]:
    """For each cell of a student level (Hs, Ws): the row and column of the teacher level's
    cell under its centre. ``scale``: teacher image pixels per student image pixel (h, w)."""
    rows = ((torch.arange(s_shape[0], device=device) + 0.5) * s_stride[0] * scale[0]
            / t_stride[0]).floor().long().clamp(0, t_shape[0] - 1)
    cols = ((torch.arange(s_shape[1], device=device) + 0.5) * s_stride[1] * scale[1]
            / t_stride[1]).floor().long().clamp(0, t_shape[1] - 1)
    return rows, cols


@torch.no_grad()
def teacher_dense(teacher, images: Sequence[Tensor], student_list, student_shapes: list,
                  num_anchors: int) -> tuple[Tensor, Tensor]:
    """The teacher's (N, M, K_t) logits and (N, M, 4) decoded boxes on the student's M anchors,
    boxes in the student's image coordinates (module docstring). ``images``: the batch as the
    loader gives it (before any model transform); ``student_list``: the student's ImageList;
    ``student_shapes``: the student's feature sizes per level."""
    image_list, _ = batch_transform(teacher.transform, list(images))
    features = list(teacher.backbone(image_list.tensors).values())
    out = teacher.head(features)
    anchors = batch_anchors(teacher.anchor_generator, image_list, features)
    boxes = torch.stack([decode_boxes(teacher.box_coder, out["bbox_regression"][i], anchors[i])
                         for i in range(len(anchors))])
    scales = [(sh / th, sw / tw) for (sh, sw), (th, tw) in
              zip(student_list.image_sizes, image_list.image_sizes)]  # student px per teacher px
    to_student = torch.tensor([[w, h, w, h] for h, w in scales], dtype=boxes.dtype,
                              device=boxes.device)
    boxes = boxes * to_student[:, None, :]
    logits = out["cls_logits"]
    t_shapes = [tuple(f.shape[-2:]) for f in features]
    same_grid = (t_shapes == [tuple(s) for s in student_shapes] and
                 teacher.anchor_generator.num_anchors_per_location()[0] == num_anchors and
                 tuple(image_list.tensors.shape[-2:]) == tuple(student_list.tensors.shape[-2:]))
    if same_grid:
        return logits, boxes
    if len(t_shapes) != len(student_shapes) or \
            teacher.anchor_generator.num_anchors_per_location()[0] != num_anchors:
        raise ValueError("teacher and student differ in FPN levels or anchors per location")
    t_pad, s_pad = image_list.tensors.shape[-2:], student_list.tensors.shape[-2:]
    out_logits, out_boxes = [], []
    start = 0
    a = num_anchors
    for (th, tw), (sh, sw) in zip(t_shapes, student_shapes):
        n_cells = th * tw * a
        lv_logits = logits[:, start:start + n_cells].reshape(len(images), th, tw, a, -1)
        lv_boxes = boxes[:, start:start + n_cells].reshape(len(images), th, tw, a, 4)
        start += n_cells
        per_image_l, per_image_b = [], []
        for i, (ratio_h, ratio_w) in enumerate(scales):
            rows, cols = _grid_index((th, tw), (sh, sw), (t_pad[0] / th, t_pad[1] / tw),
                                     (s_pad[0] / sh, s_pad[1] / sw),
                                     (1.0 / ratio_h, 1.0 / ratio_w), logits.device)
            per_image_l.append(lv_logits[i][rows][:, cols].reshape(sh * sw * a, -1))
            per_image_b.append(lv_boxes[i][rows][:, cols].reshape(sh * sw * a, 4))
        out_logits.append(torch.stack(per_image_l))
        out_boxes.append(torch.stack(per_image_b))
    return torch.cat(out_logits, 1), torch.cat(out_boxes, 1)


@dataclass
class MergeTeacher:
    """A frozen teacher and the classes it answers for: student label ``student_labels[j]`` is
    its output ``teacher_labels[j]``."""

    model: torch.nn.Module
    student_labels: Sequence[int]
    teacher_labels: Sequence[int]
    name: str = "teacher"


class MergeCriterion:
    """``loss_fn(images, targets) -> {"loss_distill_cls", "loss_distill_box"[, "loss_cls",
    "loss_box"]}`` for a student learning from ``teachers`` (module docstring). ``detection``:
    the ground-truth loss for images with labels (None: pure distillation)."""

    def __init__(self, student, teachers: Sequence[MergeTeacher], num_classes: int,
                 mcfg: dict, detection: DetectionLoss | None = None,
                 labelled: Sequence[int] = ()):
        self.student = student
        self.teachers = list(teachers)  # plain attribute: never submodules of the student
        self.num_classes = int(num_classes)
        self.temperature = float(mcfg["temperature"])
        self.gamma = float(mcfg["gamma"])
        self.box_thresh = float(mcfg["box_thresh"])
        self.anchors = mcfg.get("anchors", "all")
        check_choice("merge.anchors", self.anchors, ("all", "erd"))
        self.detection = detection
        counts = torch.zeros(self.num_classes)
        for t in self.teachers:
            counts[list(t.student_labels)] += 1
        labelled = sorted(set(int(c) for c in labelled))
        if labelled and detection is None:
            raise ValueError("labelled classes need the ground-truth loss")
        if (counts[labelled] > 0).any():
            raise ValueError(f"student labels {labelled} learn from labels alone, yet a teacher "
                             "answers for some of them")
        counts[labelled] = -1
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"student labels {missing} have no teacher")
        # the distilled classes: every class but those the transfer set's labels alone train
        self.distilled = (counts > 0).nonzero().flatten().tolist()
        self._counts = counts.clamp(min=1)
        for t in self.teachers:
            t.model.eval()
            for p in t.model.parameters():
                p.requires_grad_(False)

    def targets(self, images, image_list, student_shapes) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(N, M, K) target probabilities at the temperature, (N, M) their highest probability
        at T = 1, and the box teacher's (N, M, 4) boxes and (N, M) confidence."""
        num_anchors = self.student.anchor_generator.num_anchors_per_location()[0]
        prob = prob1 = best_conf = best_boxes = None
        for t in self.teachers:
            logits, boxes = teacher_dense(t.model, images, image_list, student_shapes,
                                          num_anchors)
            z = logits[:, :, list(t.teacher_labels)].float()
            if prob is None:
                n, m = z.shape[:2]
                prob = z.new_zeros((n, m, self.num_classes))
                prob1 = z.new_zeros((n, m, self.num_classes))
                best_conf = z.new_full((n, m), -1.0)
                best_boxes = boxes.new_zeros((n, m, 4))
            labels = list(t.student_labels)
            prob[:, :, labels] += torch.sigmoid(z / self.temperature)
            p1 = torch.sigmoid(z)
            prob1[:, :, labels] += p1
            conf = p1.amax(-1)
            better = conf > best_conf
            best_conf = torch.where(better, conf, best_conf)
            best_boxes = torch.where(better[..., None], boxes.float(), best_boxes)
        counts = self._counts.to(prob.device)
        prob, prob1 = prob / counts, prob1 / counts
        return prob, prob1.amax(-1), best_boxes, best_conf

    def __call__(self, images, targets) -> dict[str, Tensor]:
        head_outputs, anchors, targets_t, image_list = forward_train(self.student, images,
                                                                     targets)
        if not self.teachers:  # every class learns from labels alone
            zero = head_outputs["cls_logits"].sum() * 0.0
            return {**self.detection(head_outputs, anchors, targets_t),
                    "loss_distill_cls": zero, "loss_distill_box": zero}
        with torch.no_grad():
            shapes = _level_shapes(self.student, image_list, head_outputs)
            prob, conf, boxes, box_conf = self.targets(images, image_list, shapes)
            weight = torch.where(box_conf >= self.box_thresh, box_conf, box_conf.new_zeros(()))
            anchor_batch = torch.stack(list(anchors))
            target_deltas = encode_boxes(self.student.box_coder, boxes.flatten(0, 1),
                                         anchor_batch.flatten(0, 1).to(boxes.dtype))
            target_deltas = target_deltas.view_as(boxes)
        losses = {}
        if self.detection is not None:
            losses.update(self.detection(head_outputs, anchors, targets_t))
        logits = head_outputs["cls_logits"]
        if len(self.distilled) < self.num_classes:
            logits, prob = logits[:, :, self.distilled], prob[:, :, self.distilled]
        mask = None if self.anchors == "all" else select_by_scores(conf, self.anchors)
        losses["loss_distill_cls"] = soft_focal_distillation(logits, prob, conf,
                                                             self.temperature, self.gamma, mask)
        losses["loss_distill_box"] = box_distillation(head_outputs["bbox_regression"],
                                                      target_deltas, weight)
        return losses


def _level_shapes(model, image_list, head_outputs) -> list[tuple[int, int]]:
    """The student's feature sizes per FPN level, from the padded image size and the levels'
    strides (what its anchor generator used), checked against the number of anchors."""
    h, w = image_list.tensors.shape[-2:]
    a = model.anchor_generator.num_anchors_per_location()[0]
    shapes, total = [], 0
    for stride in _strides(model):
        shape = (-(-h // stride), -(-w // stride))
        shapes.append(shape)
        total += shape[0] * shape[1] * a
    if total != head_outputs["cls_logits"].shape[1]:
        raise ValueError(f"level sizes {shapes} do not give the head's "
                         f"{head_outputs['cls_logits'].shape[1]} anchors")
    return shapes


def _strides(model) -> list[int]:
    """Strides of the FPN levels P3-P7 of incdet's and torchvision's RetinaNets."""
    return [8, 16, 32, 64, 128][:len(model.anchor_generator.sizes)]
