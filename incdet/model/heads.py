"""RetinaNet heads whose classification subnet grows by one classifier conv per incremental step.

``IncrementalClassificationHead.classifiers[s]`` is the 3x3 conv of step ``s`` with
``A * K_s`` output channels. It reads the output of one conv tower: ``conv`` (tower 0, shared by
every step that does not branch) or ``branches[b - 1]`` (tower ``b``, added by a ``branch`` step as
a copy of the latest tower); ``tower_of_step[s]`` says which. A tower reads the features of one
FPN, ``fpn_of_tower[b]``: 0 is the backbone's own; a ``branch`` step with
``incremental.branch_from: fpn`` adds a copy of the FPN for its tower (the backbone then returns
the FPNs' features concatenated along channels, FPN ``f`` at channels ``[f C, (f + 1) C)``:
:func:`fpn_features`; the box subnet reads FPN 0). Its outputs are interleaved per
anchor into torchvision's anchor-major layout (channel ``anchor * K + class``), so the head is a
drop-in for
``torchvision.models.detection.retinanet.RetinaNetClassificationHead``: ``forward`` returns
(N, HWA, K) logits. Adding a step appends one conv and leaves earlier convs untouched, so the
old classes' logits stay bit-identical (growing one conv in place changes them by ~1e-6 on CPU,
because the convolution algorithm depends on the channel count).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")
        nn.init.normal_(conv.weight, std=0.01)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        layers.append(conv)
        if norm == "groupnorm":
            layers.append(group_norm(channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _classifier(channels: int, num_anchors: int, num_classes: int, prior: float) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    # focal-loss prior: every class starts at probability `prior` (RetinaNet, Lin et al. 2017)
    nn.init.constant_(conv.bias, -math.log((1 - prior) / prior))
    return conv


def fpn_features(x: torch.Tensor, fpn: int, channels: int) -> torch.Tensor:
    """The ``channels`` features of FPN ``fpn`` out of a backbone output that concatenates
    several FPNs' (``x`` itself when it holds one)."""
    if x.shape[1] == channels:
        return x
    return x.narrow(1, fpn * channels, channels).contiguous()


def check_fpns(fpns: Sequence[int], num_towers: int) -> list[int]:
    """``fpns[b]``: the FPN tower ``b`` reads. Tower 0 reads FPN 0; a later tower reads FPN 0
    or a new FPN (the next index)."""
    fpns = [int(f) for f in fpns]
    ok = len(fpns) == num_towers and (not fpns or fpns[0] == 0)
    top = 0
    for f in fpns[1:]:
        ok = ok and f in (0, top + 1)
        top = max(top, f)
    if not ok:
        raise ValueError(f"head FPNs {fpns} do not fit {num_towers} towers: tower 0 reads FPN 0 "
                         "and each later tower FPN 0 or the next new FPN")
    return fpns


def check_towers(towers: Sequence[int], num_steps: int) -> list[int]:
    """``towers[s]``: the tower of step ``s``. Step 0 uses tower 0 and each step uses the latest
    tower or starts the next one."""
    towers = [int(b) for b in towers]
    ok = len(towers) == num_steps and (not towers or towers[0] == 0) and \
        all(b - a in (0, 1) for a, b in zip(towers, towers[1:]))
    if not ok:
        raise ValueError(f"head towers {towers} do not fit {num_steps} steps: step 0 uses tower 0 "
                         "and each later step the latest tower or the next one")
    return towers


class IncrementalClassificationHead(nn.Module):
    """Conv towers, then one classifier conv per step.

    Args:
        classes_per_step: ``[K_0, K_1, ...]``; the head predicts ``K = sum`` classes.
        towers: the tower of each step (default: all steps share tower 0).
        fpns: the FPN each tower reads (default: all read FPN 0).
    """

    def __init__(self, in_channels: int, num_anchors: int, classes_per_step: Sequence[int],
                 num_convs: int = 4, norm: str = "groupnorm", prior_probability: float = 0.01,
                 towers: Sequence[int] | None = None, fpns: Sequence[int] | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.prior_probability = prior_probability
        self.conv = _tower(in_channels, num_convs, norm)
        self.branches = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        self.classes_per_step: list[int] = []
        self.tower_of_step: list[int] = []
        self.fpn_of_tower: list[int] = [0]
        towers = check_towers(towers if towers is not None else [0] * len(classes_per_step),
                              len(classes_per_step))
        num_towers = towers[-1] + 1 if towers else 1
        fpns = check_fpns(fpns if fpns is not None else [0] * num_towers, num_towers)
        for k, b in zip(classes_per_step, towers):
            new_tower = b > len(self.branches)
            self.grow(k, new_tower=new_tower, new_fpn=new_tower and fpns[b] > 0)

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def towers(self) -> list[nn.Module]:
        return [self.conv, *self.branches]

    @property
    def num_fpns(self) -> int:
        return max(self.fpn_of_tower) + 1

    def grow(self, num_new: int, new_tower: bool = False, new_fpn: bool = False) -> None:
        """Add a classifier for ``num_new`` classes; their label indices follow the old ones.
        ``new_tower``: it reads a new tower, a copy of the latest one (``branch``); ``new_fpn``:
        that tower reads a new FPN (the caller adds the FPN to the backbone), else FPN 0."""
        if num_new <= 0:
            raise ValueError("a step must add at least one class")
        if new_fpn and not new_tower:
            raise ValueError("a new FPN comes with a new tower")
        if new_tower:
            self.branches.append(copy.deepcopy(self.towers()[-1]))
            self.fpn_of_tower.append(self.num_fpns if new_fpn else 0)
        ref = next(self.conv.parameters(), None)
        conv = _classifier(self.in_channels, self.num_anchors, num_new, self.prior_probability)
        if ref is not None:
            conv = conv.to(ref.device)
        self.classifiers.append(conv)
        self.classes_per_step.append(num_new)
        self.tower_of_step.append(len(self.branches))

    def forward_level(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, HWA, K)."""
        towers, c = self.towers(), self.in_channels
        # each tower runs once, on its FPN's features; a step's classifier reads its tower
        outs = [tower(fpn_features(features, f, c))
                for tower, f in zip(towers, self.fpn_of_tower)]
        n, _, h, w = outs[0].shape
        per_step = [clf(outs[b]).view(n, self.num_anchors, k, h, w)
                    for clf, k, b in zip(self.classifiers, self.classes_per_step,
                                         self.tower_of_step)]
        logits = per_step[0] if len(per_step) == 1 else torch.cat(per_step, dim=2)  # (N,A,K,H,W)
        return logits.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.forward_level(f) for f in x], dim=1)


class RegressionHead(nn.Module):
    """Box regression subnet: conv tower and a conv with ``A * 4`` outputs -> (N, HWA, 4)."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4,
                 norm: str = "groupnorm"):
        super().__init__()
        self.conv = _tower(in_channels, num_convs, norm)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for f in x:
            r = self.bbox_reg(self.conv(f))
            n, _, h, w = r.shape
            out.append(r.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return torch.cat(out, dim=1)


class IncrementalHead(nn.Module):
    """Drop-in for ``RetinaNetHead``: returns ``{"cls_logits": (N, HWA, K),
    "bbox_regression": (N, HWA, 4)}``. Losses live in :mod:`incdet.train.losses`, not here."""

    def __init__(self, in_channels: int, num_anchors: int, classes_per_step: Sequence[int],
                 num_convs: int = 4, norm: str = "groupnorm", prior_probability: float = 0.01,
                 towers: Sequence[int] | None = None, fpns: Sequence[int] | None = None):
        super().__init__()
        self.classification_head = IncrementalClassificationHead(
            in_channels, num_anchors, classes_per_step, num_convs, norm, prior_probability, towers,
            fpns)
        self.regression_head = RegressionHead(in_channels, num_anchors, num_convs, norm)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.classification_head.in_channels
        return {"cls_logits": self.classification_head(x),
                "bbox_regression": self.regression_head([fpn_features(f, 0, c) for f in x])}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels that divide ``channels`` (any width
    works: mobilenet's 40 or 72 channels as well as a 16-channel test head)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def norm_layer_for(name: str) -> Callable[[int], nn.Module]:
    return {"batchnorm": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d,
            "frozen_eval": EvalBatchNorm2d, "groupnorm": group_norm}[name]


class EvalBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` (same parameters and buffers) that computes exactly as
    ``nn.BatchNorm2d`` does in eval mode. ``FrozenBatchNorm2d`` folds the statistics into one
    scale and shift, which rounds differently (about 1e-4 px on the boxes of a ResNet-50
    detector); a detector trained with ``BatchNorm2d`` (torchvision's ``_v2``) keeps its exact
    outputs with this one (``model.norm: frozen_eval``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                        self.bias, False, 0.0, self.eps)
