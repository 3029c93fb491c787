"""Detection losses as pure functions over head outputs: the label-space-masked focal loss and the
box regression loss. Each returns a scalar; :class:`DetectionLoss` returns ``{"loss_cls",
"loss_box"}`` (DETR-style: the total is a weighted sum taken by the trainer).

Missing annotations: an image's ``label_space`` lists the label indices it is annotated for. The
focal loss gives background targets only on those channels, so an unlabelled object of another
class is never taught as background (README, "Missing annotations").
"""
from __future__ import annotations

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from incdet.distributed import global_count
from incdet.errors import check_choice

BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS


def match_anchors(matcher, anchors: list[torch.Tensor], targets: list[dict]) -> list[torch.Tensor]:
    """Per image, the index of the matched target box per anchor: (HWA,), -1 background,
    -2 between thresholds (ignored)."""
    out = []
    for anchors_per_image, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            out.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                  device=anchors_per_image.device))
        else:
            out.append(matcher(box_iou(t["boxes"], anchors_per_image)))
    return out


def label_space_mask(targets: list[dict], num_classes: int, device) -> torch.Tensor:
    """(N, K) bool: channel k is annotated on image n."""
    mask = torch.zeros(len(targets), num_classes, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        space = t.get("label_space")
        if space is None:
            mask[i] = True
        else:
            mask[i, space.to(device)] = True
    return mask


def masked_focal_loss(cls_logits: torch.Tensor, targets: list[dict],
                      matched_idxs: list[torch.Tensor], alpha: float = 0.25,
                      gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss over (N, HWA, K) logits, restricted per image to its label space,
    normalised by the number of foreground anchors in the batch (the global batch under
    several processes, see :mod:`incdet.distributed`)."""
    n, hwa, k = cls_logits.shape
    gt = torch.zeros_like(cls_logits)
    valid = torch.zeros(n, hwa, dtype=torch.bool, device=cls_logits.device)
    num_fg = 0
    for i, (t, m) in enumerate(zip(targets, matched_idxs)):
        fg = m >= 0
        num_fg += int(fg.sum())
        gt[i, fg, t["labels"][m[fg]]] = 1.0
        valid[i] = m != BETWEEN_THRESHOLDS
    # positives always count (a pseudo-label may be of a class outside the label space)
    weight = (valid[:, :, None] & label_space_mask(targets, k, cls_logits.device)[:, None, :]) \
        | (gt > 0)
    loss = sigmoid_focal_loss(cls_logits, gt, alpha=alpha, gamma=gamma, reduction="none")
    return (loss * weight).sum() / max(1.0, global_count(num_fg, cls_logits.device))


def box_regression_loss(bbox_regression: torch.Tensor, anchors: list[torch.Tensor],
                        targets: list[dict], matched_idxs: list[torch.Tensor], box_coder,
                        kind: str = "giou") -> torch.Tensor:
    """Regression loss over foreground anchors (``giou`` on decoded boxes, or ``l1`` /
    ``smooth_l1`` on encoded deltas), normalised by the number of foreground anchors."""
    total = bbox_regression.sum() * 0.0
    num_fg = 0
    for reg, anc, t, m in zip(bbox_regression, anchors, targets, matched_idxs):
        fg = torch.where(m >= 0)[0]
        if fg.numel() == 0:
            continue
        num_fg += fg.numel()
        gt_boxes = t["boxes"][m[fg]]
        if kind == "giou":
            pred = box_coder.decode_single(reg[fg], anc[fg])
            total = total + generalized_box_iou_loss(pred, gt_boxes, reduction="sum")
        else:
            target = box_coder.encode_single(gt_boxes, anc[fg])
            fn = torch.nn.functional.l1_loss if kind == "l1" else \
                torch.nn.functional.smooth_l1_loss
            kwargs = {} if kind == "l1" else {"beta": 1.0 / 9}
            total = total + fn(reg[fg], target, reduction="sum", **kwargs)
    return total / max(1.0, global_count(num_fg, bbox_regression.device))


class DetectionLoss:
    """``{"loss_cls", "loss_box"}`` for a batch, from the ``loss`` config section.

    ``replay_weight``: None pools every image of the batch under one normalisation (by the
    batch's foreground anchors). A number splits the batch by the targets' ``replayed`` flag:
    each part's losses are normalised by its own foreground anchors, and the loss is
    ``L(new images) + replay_weight * L(replayed memory images)``, so the new images' loss is the
    same whether or not memory images are in the batch (memory.replay_loss: separate).
    """

    def __init__(self, lcfg: dict, box_coder, matcher, replay_weight: float | None = None):
        check_choice("loss.box", lcfg["box"], ("giou", "l1", "smooth_l1"))
        self.cfg = lcfg
        self.box_coder = box_coder
        self.matcher = matcher
        self.replay_weight = replay_weight

    def __call__(self, head_outputs: dict, anchors: list[torch.Tensor], targets: list[dict],
                 matched_idxs: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if matched_idxs is None:
            matched_idxs = match_anchors(self.matcher, anchors, targets)
        if self.replay_weight is None:
            return self._pooled(head_outputs, anchors, targets, matched_idxs)
        replayed = [bool(t.get("replayed", False)) for t in targets]
        # both parts are always computed (possibly empty), so that every process of a
        # distributed run takes part in the same foreground-count reductions
        parts = []
        for flag in (False, True):
            idx = [i for i, r in enumerate(replayed) if r == flag]
            sel = torch.tensor(idx, dtype=torch.long, device=head_outputs["cls_logits"].device)
            parts.append(self._pooled({k: v.index_select(0, sel) for k, v in head_outputs.items()},
                                      [anchors[i] for i in idx], [targets[i] for i in idx],
                                      [matched_idxs[i] for i in idx]))
        return {k: parts[0][k] + self.replay_weight * parts[1][k] for k in parts[0]}

    def _pooled(self, head_outputs, anchors, targets, matched_idxs) -> dict[str, torch.Tensor]:
        return {
            "loss_cls": masked_focal_loss(head_outputs["cls_logits"], targets, matched_idxs,
                                          self.cfg["focal_alpha"], self.cfg["focal_gamma"]),
            "loss_box": box_regression_loss(head_outputs["bbox_regression"], anchors, targets,
                                            matched_idxs, self.box_coder, self.cfg["box"]),
        }
