"""Builds a torchvision ``RetinaNet`` (sigmoid focal loss) with an FPN backbone and a growable head.

Backbones: resnet18 / resnet34 / resnet50 (FPN on C3-C5, P6-P7 from P5) and mobilenet_v3_large
(FPN on its last two stages, P6-P7 on top). ``model.weights`` is null (train from scratch, with
trainable BatchNorm: a ``FrozenBatchNorm2d`` with random statistics normalises nothing), a
torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V1`` read from the local torch hub
cache (nothing is downloaded), or a path to a backbone ``state_dict`` file.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from incdet.errors import UserError, check_choice
from incdet.model.heads import IncrementalHead, norm_layer_for

BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")


def resolve_weights(spec: str | None) -> dict | None:
    """A backbone state dict from a weights name (local torch cache only) or a file, or None."""
    if spec is None:
        return None
    path = Path(os.path.expanduser(str(spec)))
    if not path.is_file():
        if path.suffix in (".pt", ".pth") or os.sep in str(spec):
            raise UserError(f"model.weights: file {path} does not exist; give an existing backbone "
                            "state_dict file or a torchvision weights name")
        try:
            weights = torchvision.models.get_weight(str(spec))
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"model.weights: {spec!r} is neither a file nor a torchvision weights "
                            "name such as 'ResNet50_Weights.IMAGENET1K_V1'") from None
        name = os.path.basename(urlparse(weights.url).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if not path.is_file():
            raise UserError(f"model.weights: {spec} is not in the local torch cache ({path}); "
                            "incdet never downloads: copy the file there or set model.weights "
                            "to a path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"model.weights: cannot load {path} as a data-only state dict ({e})") \
            from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def _freeze(module: nn.Module, trainable: Sequence[str]) -> None:
    for name, param in module.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            param.requires_grad_(False)


def build_backbone(mcfg: dict) -> BackboneWithFPN:
    name = mcfg["backbone"]
    check_choice("model.backbone", name, BACKBONES)
    state = resolve_weights(mcfg.get("weights"))
    norm = mcfg.get("norm", "auto")
    if norm == "auto":
        norm = "frozen" if state is not None else "batchnorm"
    check_choice("model.norm", norm, ("auto", "batchnorm", "groupnorm", "frozen"))
    if norm == "frozen" and state is None:
        raise UserError("model.norm: 'frozen' needs pretrained model.weights; training from "
                        "scratch needs trainable normalisation (batchnorm or groupnorm)")
    norm_layer = norm_layer_for(norm)
    channels = int(mcfg["fpn_channels"])
    trainable_layers = int(mcfg.get("trainable_layers", 5)) if state is not None else 5
    if name.startswith("resnet"):
        body = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if state is not None:
            body.load_state_dict(state, strict=False)
        stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            stages.append("bn1")
        _freeze(body, stages)
        c5 = body.fc.in_features
        in_channels = [c5 // 4, c5 // 2, c5]
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    else:
        shape = {"width_mult": float(mcfg.get("width_mult", 1.0)),
                 "reduced_tail": bool(mcfg.get("reduced_tail", False))}
        if state is not None and shape != {"width_mult": 1.0, "reduced_tail": False}:
            raise UserError("model.width_mult / model.reduced_tail change the mobilenet's shape, "
                            "so pretrained model.weights do not fit it: set model.width_mult=1.0 "
                            "and model.reduced_tail=false")
        features = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer,
                                                         **shape).features
        if state is not None:
            feature_state = {k[len("features."):]: v for k, v in state.items()
                             if k.startswith("features.")}
            features.load_state_dict(feature_state or state, strict=False)
        stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] \
            + [len(features) - 1]
        # torchvision's semantics: the last `trainable_layers` stages train (all from scratch)
        freeze_before = stage_indices[len(stage_indices) - trainable_layers] \
            if state is not None and trainable_layers < len(stage_indices) else 0
        for b in features[:freeze_before]:
            for p in b.parameters():
                p.requires_grad_(False)
        body = features
        # outputs at strides 8, 16 and 32: the block before each of the last two downsamplings,
        # and the final conv (torchvision's detection variant takes stride 32 only, which is too
        # coarse for small objects)
        picks = [stage_indices[-3] - 1, stage_indices[-2] - 1, len(features) - 1]
        in_channels = [features[i].out_channels for i in picks]
        return_layers = {str(i): str(j) for j, i in enumerate(picks)}
    fpn_norm = mcfg.get("fpn_norm", "none") or "none"
    check_choice("model.fpn_norm", fpn_norm, ("none", "batchnorm", "groupnorm"))
    return BackboneWithFPN(body, return_layers, in_channels, channels,
                           extra_blocks=LastLevelP6P7(channels, channels),
                           norm_layer=None if fpn_norm == "none" else norm_layer_for(fpn_norm))


def build_anchor_generator(mcfg: dict, num_levels: int) -> AnchorGenerator:
    sizes = list(mcfg["anchor_sizes"])
    if len(sizes) != num_levels:
        raise UserError(f"model.anchor_sizes: {len(sizes)} sizes given, but the "
                        f"{mcfg['backbone']} FPN has {num_levels} levels; give one size per level")
    n = int(mcfg["anchor_scales"])
    per_level = tuple(tuple(float(s) * 2 ** (i / n) for i in range(n)) for s in sizes)
    ratios = (tuple(float(r) for r in mcfg["aspect_ratios"]),) * len(sizes)
    return AnchorGenerator(per_level, ratios)


def build_model(mcfg: dict, classes_per_step: Sequence[int]) -> RetinaNet:
    """A RetinaNet predicting ``sum(classes_per_step)`` classes, head laid out per step."""
    backbone = build_backbone(mcfg)
    num_levels = 5  # P3-P5 from the backbone, P6-P7 on top
    anchors = build_anchor_generator(mcfg, num_levels)
    head = IncrementalHead(backbone.out_channels, anchors.num_anchors_per_location()[0],
                           classes_per_step, num_convs=int(mcfg["head_convs"]),
                           norm=mcfg["head_norm"], prior_probability=mcfg["prior_probability"])
    model = RetinaNet(backbone, num_classes=sum(classes_per_step), min_size=mcfg["min_size"],
                      max_size=mcfg["max_size"], anchor_generator=anchors, head=head,
                      score_thresh=mcfg["score_thresh"], nms_thresh=mcfg["nms_thresh"],
                      detections_per_img=mcfg["detections_per_img"],
                      topk_candidates=mcfg["topk_candidates"],
                      fg_iou_thresh=mcfg["fg_iou_thresh"], bg_iou_thresh=mcfg["bg_iou_thresh"])
    return model


def head_layout(model: RetinaNet) -> list[int]:
    return list(model.head.classification_head.classes_per_step)


def forward_train(model: RetinaNet, images: list[torch.Tensor], targets: list[dict] | None):
    """The training-time forward pass, returning what the losses need.

    Returns ``(head_outputs, anchors, targets, image_list)``: ``head_outputs["cls_logits"]``
    (N, HWA, K), ``["bbox_regression"]`` (N, HWA, 4), ``anchors`` a list of (HWA, 4), and the
    targets resized like the images.
    """
    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    return head_outputs, anchors, targets, image_list


def features_of(model: RetinaNet, image_list) -> OrderedDict:
    """FPN features of already-transformed images (for RoI features and the teacher)."""
    return model.backbone(image_list.tensors)
