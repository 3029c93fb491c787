"""RetinaNet heads whose classification subnet grows by one classifier conv per incremental step.

``IncrementalClassificationHead.classifiers[s]`` is the 3x3 conv of step ``s`` with
``A * K_s`` output channels. Its outputs are interleaved per anchor into torchvision's anchor-major
layout (channel ``anchor * K + class``), so the head is a drop-in for
``torchvision.models.detection.retinanet.RetinaNetClassificationHead``: ``forward`` returns
(N, HWA, K) logits. Adding a step appends one conv and leaves earlier convs untouched, so the
old classes' logits stay bit-identical (growing one conv in place changes them by ~1e-6 on CPU,
because the convolution algorithm depends on the channel count).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


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


class IncrementalClassificationHead(nn.Module):
    """Shared conv tower, then one classifier conv per step.

    Args:
        classes_per_step: ``[K_0, K_1, ...]``; the head predicts ``K = sum`` classes.
    """

    def __init__(self, in_channels: int, num_anchors: int, classes_per_step: Sequence[int],
                 num_convs: int = 4, norm: str = "groupnorm", prior_probability: float = 0.01):
        super().__init__()
        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.prior_probability = prior_probability
        self.conv = _tower(in_channels, num_convs, norm)
        self.classifiers = nn.ModuleList()
        self.classes_per_step: list[int] = []
        for k in classes_per_step:
            self.grow(k)

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def grow(self, num_new: int) -> None:
        """Add a classifier for ``num_new`` classes; their label indices follow the old ones."""
        if num_new <= 0:
            raise ValueError("a step must add at least one class")
        ref = next(self.conv.parameters(), None)
        conv = _classifier(self.in_channels, self.num_anchors, num_new, self.prior_probability)
        if ref is not None:
            conv = conv.to(ref.device)
        self.classifiers.append(conv)
        self.classes_per_step.append(num_new)

    def forward_level(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, HWA, K)."""
        t = self.conv(features)
        n, _, h, w = t.shape
        per_step = [clf(t).view(n, self.num_anchors, k, h, w)
                    for clf, k in zip(self.classifiers, self.classes_per_step)]
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
    "bbox_regression": (N, HWA, 4)}``. Losses live in :mod:`incdet.losses`, not here."""

    def __init__(self, in_channels: int, num_anchors: int, classes_per_step: Sequence[int],
                 num_convs: int = 4, norm: str = "groupnorm", prior_probability: float = 0.01):
        super().__init__()
        self.classification_head = IncrementalClassificationHead(
            in_channels, num_anchors, classes_per_step, num_convs, norm, prior_probability)
        self.regression_head = RegressionHead(in_channels, num_anchors, num_convs, norm)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"cls_logits": self.classification_head(x),
                "bbox_regression": self.regression_head(x)}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels that divide ``channels`` (any width
    works: mobilenet's 40 or 72 channels as well as a 16-channel test head)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def norm_layer_for(name: str) -> Callable[[int], nn.Module]:
    from torchvision.ops import FrozenBatchNorm2d

    return {"batchnorm": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d,
            "groupnorm": group_norm}[name]
