"""Detection losses as pure functions over head outputs: the label-space-masked focal loss and the
box regression loss. Each returns a scalar; :class:`DetectionLoss` returns ``{"loss_cls",
"loss_box"}`` (DETR-style: the total is a weighted sum taken by the trainer).

Missing annotations: an image's ``label_space`` lists the label indices it is annotated for. The
focal loss gives background targets only on those channels, so an unlabelled object of another
class is never taught as background (README, "Missing annotations").

Everything is batched over the images of a batch (no Python loop per image on the hot path): the
targets are padded to the batch's largest box count (:func:`pad_targets`), the anchors of all
images are matched with one (N, M, A) IoU tensor (:func:`match_anchors`, torchvision's
``Matcher`` semantics exactly), and the losses gather the matched boxes and labels from the padded
targets. Foreground counts stay on the device; the only host synchronisation is the ``nonzero``
that gathers the foreground anchors of the box loss (:func:`giou_loss_sum` needs none, unlike
torchvision's ``generalized_box_iou_loss``, which indexes with boolean masks).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from incdet.base.devices import host_to_device
from incdet.base.distributed import global_count
from incdet.base.errors import check_choice

BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS
BELOW_LOW_THRESHOLD = det_utils.Matcher.BELOW_LOW_THRESHOLD
# the largest IoU tensor (images x boxes x anchors) computed at once: 2**25 floats, 128 MiB, and
# box_iou's intermediates a few times that (a COCO batch is matched a few images at a time, the
# CPU preset's in one go)
IOU_BUDGET = 2 ** 25


class PaddedTargets(NamedTuple):
    """The targets of N images padded to the batch's largest box count M."""

    boxes: torch.Tensor  # (N, M, 4) xyxy; padding: zeros
    labels: torch.Tensor  # (N, M) label indices; padding: 0
    valid: torch.Tensor  # (N, M) bool: a real box

    def select(self, index: torch.Tensor) -> PaddedTargets:
        """The images ``index`` (a 1-D long tensor)."""
        return PaddedTargets(*(v.index_select(0, index) for v in self))


def pad_targets(targets: Sequence[dict], device=None) -> PaddedTargets:
    """``boxes`` and ``labels`` of every target padded to the largest box count of the batch.
    ``device``: where an empty batch's tensors go (otherwise the targets' device)."""
    if not targets:
        return PaddedTargets(torch.zeros(0, 0, 4, device=device),
                             torch.zeros(0, 0, dtype=torch.int64, device=device),
                             torch.zeros(0, 0, dtype=torch.bool, device=device))
    counts = [int(t["boxes"].shape[0]) for t in targets]  # shapes: known on the host
    n, m = len(targets), max(counts)
    first = targets[0]["boxes"]
    boxes = first.new_zeros((n, m, 4))
    # labels are >= 0 (RetinaNet has no background channel): -1 marks the padding
    labels = targets[0]["labels"].new_full((n, m), -1)
    if m:  # one scatter of all the boxes (padding per image would cost operators per image)
        rows = [i for i, c in enumerate(counts) for _ in range(c)]
        cols = [j for c in counts for j in range(c)]
        where = host_to_device([rows, cols], torch.int64, first.device)
        boxes[where[0], where[1]] = torch.cat([t["boxes"] for t in targets])
        labels[where[0], where[1]] = torch.cat([t["labels"] for t in targets])
    valid = labels >= 0
    return PaddedTargets(boxes, labels.clamp(min=0), valid)


def _as_batch(per_image, shape_tail: tuple, device, dtype) -> torch.Tensor:
    """A list of equally shaped per-image tensors as one (N, ...) tensor (a tensor: as it is)."""
    if torch.is_tensor(per_image):
        return per_image
    if len(per_image) == 0:
        return torch.zeros((0, *shape_tail), dtype=dtype, device=device)
    return torch.stack(list(per_image))


def _match(matcher, anchors: torch.Tensor, boxes: torch.Tensor,
           valid: torch.Tensor) -> torch.Tensor:
    """(n, A, 4) anchors, (n, M, 4) boxes, (n, M) valid -> (n, A) matches (M >= 1).

    The padding boxes (zeros, after the real ones) have IoU 0 with every anchor: they never
    beat a real box (the first best box wins ties, as in ``Matcher``), and an image that has
    only padding is set to background at the end."""
    iou = box_iou(boxes, anchors)  # (n, M, A)
    vals, best = iou.max(dim=1)  # the best box of each anchor (the first one on ties)
    matches = torch.where(vals < matcher.low_threshold, BELOW_LOW_THRESHOLD,
                          torch.where(vals < matcher.high_threshold, BETWEEN_THRESHOLDS, best))
    if matcher.allow_low_quality_matches:
        # every anchor that is the best (ties included) of some box keeps its best box, however
        # low the IoU (torchvision's Matcher.set_low_quality_matches_); NaN: padding is no box
        best_iou = iou.amax(dim=2, keepdim=True).masked_fill(~valid[:, :, None], float("nan"))
        matches = torch.where((iou == best_iou).any(dim=1), best, matches)
    return torch.where(valid.any(dim=1, keepdim=True), matches, BELOW_LOW_THRESHOLD)


def match_anchors(matcher, anchors, targets: Sequence[dict],
                  padded: PaddedTargets | None = None) -> torch.Tensor:
    """(N, HWA) index of the matched target box per anchor, all images at once: -1 background,
    -2 between thresholds (ignored). Equal to torchvision's ``Matcher`` (its thresholds and
    ``allow_low_quality_matches``) applied image by image to ``box_iou(boxes, anchors)``; an
    image without boxes is all background.

    ``anchors``: (N, HWA, 4), or a list of N (HWA, 4) (RetinaNet's: the same HWA for every image
    of a batch). ``padded``: :func:`pad_targets` of ``targets``, when the caller has it."""
    anchors = _as_batch(anchors, (0, 4), None, torch.float32)
    if padded is None:
        padded = pad_targets(targets, anchors.device)
    n, a = anchors.shape[:2]
    m = padded.boxes.shape[1]
    if m == 0:
        return torch.full((n, a), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    step = max(1, IOU_BUDGET // (m * a))
    if step >= n:
        return _match(matcher, anchors, padded.boxes, padded.valid)
    return torch.cat([_match(matcher, anchors[i:i + step], padded.boxes[i:i + step],
                             padded.valid[i:i + step]) for i in range(0, n, step)])


def label_space_mask(targets: Sequence[dict], num_classes: int, device) -> torch.Tensor:
    """(N, K) bool: channel k is annotated on image n (every channel when a target has no
    ``label_space``)."""
    mask = torch.zeros(len(targets), num_classes, dtype=torch.bool, device=device)
    spaces = [t.get("label_space") for t in targets]
    given = [i for i, s in enumerate(spaces) if s is not None]
    if given:
        rows = host_to_device([i for i in given for _ in range(len(spaces[i]))], torch.int64,
                              device)
        cols = torch.cat([spaces[i] for i in given]).to(device, non_blocking=True)
        # a value made on the device: ``mask[...] = True`` would copy a host scalar (blocking)
        mask.index_put_((rows, cols), mask.new_ones(()))
    if len(given) < len(targets):
        rows = host_to_device([i for i, s in enumerate(spaces) if s is None], torch.int64, device)
        mask.index_put_((rows,), mask.new_ones(()))
    return mask


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(z))``, stably. On CPU torch's ``softplus`` (and ``log1p``) is not vectorised:
    about 10 x slower than this form (1.6 against 0.2 ms for the CPU preset's 160 k logits),
    ``max(z, 0) + log1p(e)`` with ``e = exp(-|z|)`` and ``log1p(e)`` computed as
    ``log(u) - ((u - 1) - e) / u``, ``u = 1 + e`` (exact where ``u`` rounds to 1, and within a
    few ulps elsewhere)."""
    if z.device.type != "cpu":
        return F.softplus(z)
    e = (-z.abs()).exp()
    u = 1 + e
    return z.clamp(min=0) + (u.log() - ((u - 1) - e) / u)


class _FocalSum(torch.autograd.Function):
    """The focal loss of logits ``x`` with binary targets ``positive``, summed over the elements
    that count: the positives (weighted ``alpha``) and the ``negative`` ones (weighted
    ``1 - alpha``); ``alpha < 0``: no weighting, as in torchvision. The sum of torchvision's
    ``sigmoid_focal_loss`` times that mask, in a few elementwise operators, with the gradient in
    closed form.

    With ``z = -x`` on positives and ``x`` elsewhere, ``1 - p_t = sigmoid(z)`` and
    ``-log(p_t) = softplus(z)``; with ``q = sigmoid(z)``, ``d/dz (q**g * softplus(z)) =
    q**g * (g * (1 - q) * softplus(z) + q)``. Computed in float32 at least; only the logits (in
    their own dtype) and the two masks are kept for the backward, which recomputes the rest: for
    a COCO batch of 16 (150 M logits) 0.9 GB kept (0.6 GB with bf16 logits) instead of 2.6 GB."""

    @staticmethod
    def _terms(x, positive, negative, alpha: float, gamma: float):
        """``coef``, ``q``, ``softplus(z)`` and ``q ** gamma``."""
        if alpha >= 0:
            coef = torch.where(positive, alpha, negative.to(x.dtype) * (1 - alpha))
        else:
            coef = (positive | negative).to(x.dtype)
        z = torch.where(positive, -x, x)
        q = z.sigmoid()
        return coef, q, _softplus(z), q.pow(gamma)

    @staticmethod
    def forward(ctx, logits, positive, negative, alpha: float, gamma: float):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        coef, _, ce, qg = _FocalSum._terms(x, positive, negative, alpha, gamma)
        ctx.save_for_backward(logits, positive, negative)  # bf16 logits stay bf16 meanwhile
        ctx.alpha, ctx.gamma = alpha, gamma
        return (coef * qg * ce).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, positive, negative = ctx.saved_tensors
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        coef, q, ce, qg = _FocalSum._terms(x, positive, negative, ctx.alpha, ctx.gamma)
        dz = (coef * grad) * qg * ((1 - q) * ce * ctx.gamma + q)
        return torch.where(positive, -dz, dz).to(logits.dtype), None, None, None, None


def masked_focal_loss(cls_logits: torch.Tensor, targets: Sequence[dict], matched_idxs,
                      alpha: float = 0.25, gamma: float = 2.0,
                      padded: PaddedTargets | None = None,
                      objects_negative_for_all: bool = False) -> torch.Tensor:
    """Sigmoid focal loss over (N, HWA, K) logits, restricted per image to its label space,
    normalised by the number of foreground anchors in the batch (the global batch under
    several processes, see :mod:`incdet.base.distributed`). ``matched_idxs``: (N, HWA), or a list of
    (HWA,), as :func:`match_anchors` gives. ``objects_negative_for_all``: an anchor matched to an
    annotated box is a negative of every class but the box's, also outside the label space (the
    label says what the object is; ``incremental.labelled_anchors: labels``).

    The value of torchvision's ``sigmoid_focal_loss`` times the mask, computed in float32 (at
    least) by :class:`_FocalSum`: a third of the operators, and only the logits and two masks
    kept for the backward."""
    n, hwa, k = cls_logits.shape
    device = cls_logits.device
    matched = _as_batch(matched_idxs, (hwa,), device, torch.int64)
    if padded is None:
        padded = pad_targets(targets, device)
    fg = matched >= 0  # (N, HWA)
    positive = torch.zeros(cls_logits.shape, dtype=torch.bool, device=device)
    if padded.labels.shape[1]:
        labels = padded.labels.gather(1, matched.clamp(min=0))  # (N, HWA): the matched box's
        positive.scatter_(2, labels[:, :, None], fg[:, :, None])
    # negatives count on the annotated channels of anchors not between thresholds; positives
    # always count (a pseudo-label may be of a class outside the label space)
    negative = (matched != BETWEEN_THRESHOLDS)[:, :, None] & \
        label_space_mask(targets, k, device)[:, None, :]
    if objects_negative_for_all:
        negative = negative | fg[:, :, None]
    loss = _FocalSum.apply(cls_logits, positive, negative, float(alpha), float(gamma))
    return loss / global_count(fg.sum()).clamp(min=1.0)


def giou_loss_sum(boxes: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sum over rows of ``1 - GIoU`` of (F, 4) xyxy ``boxes`` and ``target``: the value of
    torchvision's ``generalized_box_iou_loss(..., reduction="sum")``, with the intersection
    clamped at zero instead of computed under a boolean mask (no host synchronisation)."""
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    x1g, y1g, x2g, y2g = target.unbind(dim=-1)
    inter = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0) * \
        (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * \
        (torch.max(y2, y2g) - torch.min(y1, y1g))
    return (1 - (iou - (enclosing - union) / (enclosing + eps))).sum()


def decode_boxes(box_coder, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``box_coder.decode_single(rel_codes, boxes)`` for (F, 4) codes, to the bit, without the
    two 0-dim tensors torchvision's version creates on the device at every call (on a GPU each
    is a blocking copy from the host)."""
    boxes = boxes.to(rel_codes.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = box_coder.weights
    dx, dy = rel_codes[:, 0] / wx, rel_codes[:, 1] / wy
    dw = torch.clamp(rel_codes[:, 2] / ww, max=box_coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3] / wh, max=box_coder.bbox_xform_clip)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * (torch.exp(dw) * widths), 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w,
                        pred_ctr_y + half_h), dim=1)


def encode_boxes(box_coder, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """``box_coder.encode_single(reference_boxes, proposals)``, with its weights sent to the
    device without a blocking copy."""
    weights = host_to_device(box_coder.weights, reference_boxes.dtype, reference_boxes.device)
    return det_utils.encode_boxes(reference_boxes, proposals, weights)


def box_regression_loss(bbox_regression: torch.Tensor, anchors, targets: Sequence[dict],
                        matched_idxs, box_coder, kind: str = "giou",
                        padded: PaddedTargets | None = None) -> torch.Tensor:
    """Regression loss over foreground anchors (``giou`` on decoded boxes, or ``l1`` /
    ``smooth_l1`` on encoded deltas), normalised by the number of foreground anchors.
    ``anchors``: (N, HWA, 4) or a list of (HWA, 4); ``matched_idxs`` as for
    :func:`masked_focal_loss`."""
    n, hwa, _ = bbox_regression.shape
    device = bbox_regression.device
    anchors = _as_batch(anchors, (hwa, 4), device, bbox_regression.dtype)
    matched = _as_batch(matched_idxs, (hwa,), device, torch.int64)
    if padded is None:
        padded = pad_targets(targets, device)
    fg = matched >= 0
    image, anchor = fg.nonzero(as_tuple=True)  # (F,) each; one host synchronisation
    reg, anc = bbox_regression[image, anchor], anchors[image, anchor]  # (F, 4)
    gt_boxes = padded.boxes[image, matched[image, anchor]]
    if kind == "giou":
        total = giou_loss_sum(decode_boxes(box_coder, reg, anc), gt_boxes)
    else:
        target = encode_boxes(box_coder, gt_boxes, anc)
        fn = F.l1_loss if kind == "l1" else F.smooth_l1_loss
        kwargs = {} if kind == "l1" else {"beta": 1.0 / 9}
        total = fn(reg, target, reduction="sum", **kwargs)
    return total / global_count(fg.sum()).clamp(min=1.0)


class DetectionLoss:
    """``{"loss_cls", "loss_box"}`` for a batch, from the ``loss`` config section.

    ``replay_weight``: None pools every image of the batch under one normalisation (by the
    batch's foreground anchors). A number splits the batch by the targets' ``replayed`` flag:
    each part's losses are normalised by its own foreground anchors, and the loss is
    ``L(new images) + replay_weight * L(replayed memory images)``, so the new images' loss is the
    same whether or not memory images are in the batch (memory.replay_loss: separate).
    """

    def __init__(self, lcfg: dict, box_coder, matcher, replay_weight: float | None = None,
                 objects_negative_for_all: bool = False):
        check_choice("loss.box", lcfg["box"], ("giou", "l1", "smooth_l1"))
        self.cfg = lcfg
        self.box_coder = box_coder
        self.matcher = matcher
        self.replay_weight = replay_weight
        self.objects_negative_for_all = objects_negative_for_all  # see masked_focal_loss

    def __call__(self, head_outputs: dict, anchors, targets: list[dict],
                 matched_idxs=None) -> dict[str, torch.Tensor]:
        """``anchors``: a list of N (HWA, 4) or (N, HWA, 4); ``matched_idxs``: (N, HWA) or a
        list of (HWA,) (default: :func:`match_anchors`)."""
        device = head_outputs["cls_logits"].device
        n, hwa = head_outputs["cls_logits"].shape[:2]
        anchors = _as_batch(anchors, (hwa, 4), device, torch.float32)
        padded = pad_targets(targets, device)
        if matched_idxs is None:
            matched = match_anchors(self.matcher, anchors, targets, padded)
        else:
            matched = _as_batch(matched_idxs, (hwa,), device, torch.int64)
        if self.replay_weight is None:
            return self._pooled(head_outputs, anchors, targets, matched, padded)
        replayed = [bool(t.get("replayed", False)) for t in targets]
        # both parts are always computed (possibly empty), so that every process of a
        # distributed run takes part in the same foreground-count reductions
        parts = []
        for flag in (False, True):
            idx = [i for i, r in enumerate(replayed) if r == flag]
            sel = host_to_device(idx, torch.long, device)
            parts.append(self._pooled({k: v.index_select(0, sel) for k, v in head_outputs.items()},
                                      anchors.index_select(0, sel), [targets[i] for i in idx],
                                      matched.index_select(0, sel), padded.select(sel)))
        return {k: parts[0][k] + self.replay_weight * parts[1][k] for k in parts[0]}

    def _pooled(self, head_outputs, anchors, targets, matched, padded) -> dict[str, torch.Tensor]:
        return {
            "loss_cls": masked_focal_loss(head_outputs["cls_logits"], targets, matched,
                                          self.cfg["focal_alpha"], self.cfg["focal_gamma"],
                                          padded, self.objects_negative_for_all),
            "loss_box": box_regression_loss(head_outputs["bbox_regression"], anchors, targets,
                                            matched, self.box_coder, self.cfg["box"], padded),
        }
