"""Builds a torchvision ``RetinaNet`` (sigmoid focal loss) with an FPN backbone and a growable head.

Backbones: resnet18 / resnet34 / resnet50 (FPN on C3-C5, P6-P7 from P5) and mobilenet_v2 /
mobilenet_v3_large / _small (FPN on the outputs at strides 8, 16 and 32, P6-P7 on top; the body's
module names and state-dict keys are torchvision's ``mobilenet_backbone``'s, ``body.<i>``).
Pretrained weights load strictly (:func:`load_pretrained`): a file of another architecture is an
error, never a silently random backbone. ``model.weights`` is null (train from scratch, with
trainable BatchNorm: a ``FrozenBatchNorm2d`` with random statistics normalises nothing), a
torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V1`` read from the local torch hub
cache (nothing is downloaded), or a path to a backbone ``state_dict`` file.

The same settings express torchvision's own RetinaNets (``retinanet_resnet50_fpn``: P6 from P5,
head without norm; ``_v2``: P6 from C5, GroupNorm head; anchor sizes given per level as lists),
so that a trained torchvision detector can be imported as step 0 (:mod:`incdet.model.torchvision`
converts it, :mod:`incdet.experiment.importer` writes the step).
With ``model.caps_per_step`` the model is an :class:`IncrementalRetinaNet`, whose
``topk_candidates`` and ``detections_per_img`` apply to each step's classes separately.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from incdet.base.devices import host_to_device
from incdet.base.errors import UserError, check_choice
from incdet.model import fetch
from incdet.model.heads import IncrementalHead, norm_layer_for

BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
             "mobilenet_v3_small")


@torch.jit.unused
def _conv_avoiding_width_1_bf16(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``, in float32 when CPU autocast is on and ``x`` is one pixel wide or high:
    there, torch 2.14's oneDNN weight gradient of a strided bf16 convolution reads memory it
    never wrote (garbage or NaN, different at every call, even in one thread; 2 pixels or more,
    float32, or without oneDNN it is correct). It hits P6 and P7 of small images (a 64 px image
    has a 1x1 P6). Float32 for these small maps only: the gradient is correct and reproducible."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[-2:]) == 1:
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


class _LastLevelP6P7(LastLevelP6P7):
    """torchvision's ``LastLevelP6P7`` (same parameters, initialisation and state dict), its
    convolutions through :func:`_conv_avoiding_width_1_bf16`."""

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]):
        x = p[-1] if self.use_P5 else c[-1]
        if torch.jit.is_scripting():  # exported models: torchvision's computation
            p6 = self.p6(x)
            p7 = self.p7(torch.nn.functional.relu(p6))
        else:
            p6 = _conv_avoiding_width_1_bf16(self.p6, x)
            p7 = _conv_avoiding_width_1_bf16(self.p7, torch.nn.functional.relu(p6))
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


class IncrementalBackbone(BackboneWithFPN):
    """torchvision's ``BackboneWithFPN`` (same modules and state dict) that can hold copies of
    its FPN, ``fpn_branches`` (``incremental.branch_from: fpn``), and of its body,
    ``body_branches`` (``branch_from: backbone``): FPN copy ``i`` reads the body
    ``body_of_fpn[i]`` (0: the shared one, ``j``: ``body_branches[j - 1]``), and the output
    concatenates every FPN's maps along channels, ``fpn`` first (one tensor per level, so
    anchors and torchvision's ``RetinaNet.forward`` are unchanged; the head picks its slices:
    :func:`incdet.model.heads.fpn_features`). Without copies it is ``BackboneWithFPN``
    exactly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fpn_branches = nn.ModuleList()
        self.body_branches = nn.ModuleList()
        self.body_of_fpn: list[int] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        body = self.body(x)
        out = self.fpn(body)
        if len(self.fpn_branches) == 0:
            return out
        bodies = [body]
        for branch in self.body_branches:
            bodies.append(branch(x))
        outs = [out]
        for i, fpn in enumerate(self.fpn_branches):
            outs.append(fpn(bodies[self.body_of_fpn[i]]))
        merged: dict[str, Tensor] = OrderedDict()
        for k in out.keys():
            merged[k] = torch.cat([o[k] for o in outs], dim=1)
        return merged

    def fpn_bodies(self) -> list[int]:
        """The body each FPN reads, FPN 0 first (what checkpoints record)."""
        return [0] + list(self.body_of_fpn)

    def add_branch(self, new_body: bool) -> None:
        """A trainable copy of the latest FPN (``new_body``: and of the latest body, which it
        reads; else it reads the latest FPN's body)."""
        latest = self.fpn_branches[-1] if len(self.fpn_branches) else self.fpn
        self.fpn_branches.append(copy.deepcopy(latest))
        body = self.fpn_bodies()[-1]
        if new_body:
            latest_body = self.body_branches[body - 1] if body else self.body
            self.body_branches.append(copy.deepcopy(latest_body))
            body = len(self.body_branches)
        self.body_of_fpn.append(body)


def check_fpn_bodies(bodies: Sequence[int], num_fpns: int) -> list[int]:
    """``bodies[i]``: the body FPN ``i`` reads; FPN 0 reads body 0 and each further body is
    first read by the FPN after the last one's (what :meth:`IncrementalBackbone.add_branch`
    builds)."""
    bodies = [int(b) for b in bodies]
    ok = len(bodies) == num_fpns and (not bodies or bodies[0] == 0)
    if not ok or any(b - prev not in (0, 1) for prev, b in zip(bodies, bodies[1:])):
        raise ValueError(f"FPN bodies {bodies} do not fit {num_fpns} FPNs: FPN 0 reads body 0, "
                         "each later FPN the previous FPN's body or a new one")
    return bodies


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
        fetchable = str(spec) in fetch.KNOWN  # tools/fetch_weights.py knows where to get it
        path = cached_weights_file(weights, "model.weights",
                                   "run `make weights` (python tools/fetch_weights.py) or set "
                                   "model.weights to a path" if fetchable else
                                   "set model.weights to a path")
    return load_state_dict_file(path, "model.weights")


def cached_weights_file(weights, key: str, alternative: str) -> Path:
    """The local torch hub cache file of a torchvision weights enum; a :class:`UserError` (named
    by ``key``, offering ``alternative``) when it is absent: incdet never downloads."""
    name = os.path.basename(urlparse(weights.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise UserError(f"{key}: {weights} is not in the local torch cache ({path}); incdet "
                        f"never downloads: copy the file there or {alternative}")
    return path


def load_state_dict_file(path: Path, key: str) -> dict:
    """A data-only state dict from ``path`` (``{"model": state}`` files are unwrapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"{key}: cannot load {path} as a data-only state dict "
                        f"({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{key}: {path} is not a state dict (a mapping of names to tensors); "
                        "save one with torch.save(model.state_dict(), path)")
    return state


def load_pretrained(module: nn.Module, state: dict, name: str, ignore: tuple[str, ...] = (),
                    key: str = "model.weights") -> int:
    """Load ``state`` into ``module`` strictly: every tensor of the module (but ``ignore``d
    prefixes, such as an ImageNet classifier the detector does not use) must be in the file with
    its shape, and the file may hold nothing else. Otherwise one :class:`UserError` saying how
    many tensors fit and which key names were expected, so that a file of another architecture
    never leaves a network silently random. Returns the number of tensors loaded."""
    def counted(keys):
        return {k for k in keys if not k.startswith(ignore) and
                not k.endswith("num_batches_tracked")}

    own = module.state_dict()
    want, given = counted(own), counted(state)
    fits = {k for k in want & given if tuple(state[k].shape) == tuple(own[k].shape)}
    if fits != want or given - want:
        first = sorted(want - fits)[:1]
        if first and first[0] in state:
            detail = (f"'{first[0]}' is {tuple(state[first[0]].shape)} in the file, "
                      f"{tuple(own[first[0]].shape)} in the backbone")
        elif first:
            found = (sorted(given - want) or ["nothing else"])[0]
            detail = f"expected names such as '{first[0]}', found '{found}'"
        else:
            detail = f"the file also has '{sorted(given - want)[0]}'"
        raise UserError(f"{key}: {len(fits)} of the {name} backbone's {len(want)} tensors match "
                        f"the file's {len(given)} ({detail}): give the state dict of a "
                        f"torchvision {name} (keys as in torchvision.models.{name}().state_dict())")
    module.load_state_dict({k: v for k, v in state.items() if not k.startswith(ignore)},
                           strict=False)  # every tensor was checked above
    return len(fits)


def _freeze(module: nn.Module, trainable: Sequence[str]) -> None:
    for name, param in module.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            param.requires_grad_(False)


def build_backbone(mcfg: dict, from_checkpoint: bool = False) -> BackboneWithFPN:
    """``from_checkpoint``: the caller loads trained weights into the model (a later step, an
    imported detector), so a frozen norm needs no ``model.weights``."""
    name = mcfg["backbone"]
    check_choice("model.backbone", name, BACKBONES)
    state = resolve_weights(mcfg.get("weights"))
    norm = mcfg.get("norm", "auto")
    if norm == "auto":
        # with weights: a ResNet keeps torchvision's frozen ImageNet statistics (its COCO recipe,
        # two images per GPU); a MobileNet trains its BatchNorm (measured on the built-in data
        # at batch 16: frozen statistics lose two thirds of step 0's AP; benchmarks.md)
        norm = "frozen" if state is not None and name.startswith("resnet") else "batchnorm"
    check_choice("model.norm", norm, ("auto", "batchnorm", "groupnorm", "frozen", "frozen_eval"))
    if norm in ("frozen", "frozen_eval") and state is None and not from_checkpoint:
        raise UserError("model.norm: 'frozen' needs pretrained model.weights; training from "
                        "scratch needs trainable normalisation (batchnorm or groupnorm)")
    norm_layer = norm_layer_for(norm)
    channels = int(mcfg["fpn_channels"])
    # a backbone that was trained before (weights, or an imported detector: frozen norm) keeps
    # its first stages frozen as torchvision does; from scratch, everything trains
    pretrained = state is not None or norm in ("frozen", "frozen_eval")
    trainable_layers = int(mcfg.get("trainable_layers", 5)) if pretrained else 5
    if name.startswith("resnet"):
        body = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if state is not None:
            # the ImageNet classifier (fc) is not part of the detector: a file may lack it
            load_pretrained(body, state, name, ignore=("fc.",))
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
        if name == "mobilenet_v2":
            if shape.pop("reduced_tail"):
                raise UserError("model.reduced_tail: mobilenet_v2 has no reduced tail (a "
                                "mobilenet_v3 setting); set model.reduced_tail=false")
        features = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer,
                                                     **shape).features
        if state is not None:
            # a classification state dict ("features.*" and the ImageNet "classifier.*", which
            # the detector does not use) or the features' own state dict
            if any(k.startswith("features.") for k in state):
                state = {k[len("features."):] if k.startswith("features.") else k: v
                         for k, v in state.items() if not k.startswith("classifier.")}
            load_pretrained(features, state, name)
        stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] \
            + [len(features) - 1]
        # torchvision's semantics: the last `trainable_layers` stages train (all from scratch)
        freeze_before = stage_indices[len(stage_indices) - trainable_layers] \
            if pretrained and trainable_layers < len(stage_indices) else 0
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
    p6_from = mcfg.get("p6_from", "p5")
    check_choice("model.p6_from", p6_from, ("p5", "c5"))
    # LastLevelP6P7 takes P5 when its input width equals the FPN's, else the last backbone map
    extra = _LastLevelP6P7(channels if p6_from == "p5" else in_channels[-1], channels)
    if p6_from == "c5" and in_channels[-1] == channels:
        raise UserError(f"model.p6_from: 'c5' needs a last backbone stage wider than the FPN "
                        f"({in_channels[-1]} = model.fpn_channels); use 'p5'")
    return IncrementalBackbone(body, return_layers, in_channels, channels, extra_blocks=extra,
                               norm_layer=None if fpn_norm == "none" else norm_layer_for(fpn_norm))


def build_anchor_generator(mcfg: dict, num_levels: int) -> AnchorGenerator:
    """One entry of ``model.anchor_sizes`` per level: a base size, expanded to
    ``model.anchor_scales`` octave scales, or a list of sizes taken as they are."""
    sizes = list(mcfg["anchor_sizes"])
    if len(sizes) != num_levels:
        raise UserError(f"model.anchor_sizes: {len(sizes)} sizes given, but the "
                        f"{mcfg['backbone']} FPN has {num_levels} levels; give one size per level")
    n = int(mcfg["anchor_scales"])
    per_level = tuple(tuple(float(v) for v in s) if isinstance(s, (list, tuple))
                      else tuple(float(s) * 2 ** (i / n) for i in range(n)) for s in sizes)
    if len({len(s) for s in per_level}) != 1:
        raise UserError(f"model.anchor_sizes: {sizes} gives levels different numbers of sizes; "
                        "the head needs the same number of anchors on every level")
    ratios = (tuple(float(r) for r in mcfg["aspect_ratios"]),) * len(sizes)
    return AnchorGenerator(per_level, ratios)


class IncrementalRetinaNet(RetinaNet):
    """A torchvision ``RetinaNet`` whose post-processing caps apply per step group.

    torchvision keeps the ``topk_candidates`` best scores per level and the
    ``detections_per_img`` best detections over all classes, so adding classes can push an old
    class's detection out. Here both caps apply to each group of ``class_groups`` (label ranges,
    one per step) on its own, exactly as torchvision applies them to a model of that group's
    classes alone: a group's detections do not depend on the other groups' logits. An image
    returns up to ``len(class_groups) * detections_per_img`` detections.
    """

    # ``class_groups`` (a list of ints, set by the builder) is an attribute without a class-level
    # annotation: TorchScript cannot read postponed annotations, and infers it from the value

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]],
                               anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]  # per level (N, HWA_l, K)
        box_regression = head_outputs["bbox_regression"]  # per level (N, HWA_l, 4)
        detections: list[dict[str, Tensor]] = []
        for index in range(len(image_shapes)):
            boxes_all, scores_all, labels_all = [], [], []
            start = 0
            for size in self.class_groups:
                boxes, scores, labels = self._detect_group(
                    [cl[index, :, start:start + size] for cl in class_logits],
                    [br[index] for br in box_regression], anchors[index], image_shapes[index])
                boxes_all.append(boxes)
                scores_all.append(scores)
                labels_all.append(labels + start)
                start += size
            detections.append({"boxes": torch.cat(boxes_all), "scores": torch.cat(scores_all),
                               "labels": torch.cat(labels_all)})
        return detections

    def _detect_group(self, logits: list[Tensor], regression: list[Tensor],
                      anchors: list[Tensor], image_shape: tuple[int, int]
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Score threshold, top-k per level, decoding, class-wise NMS and the per-image cap for
        the logits of one group (per level (HWA_l, K_g)); labels within the group."""
        boxes_l, scores_l, labels_l = [], [], []
        for logits_l, regression_l, anchors_l in zip(logits, regression, anchors):
            k = logits_l.shape[-1]
            # contiguous first: the sigmoid of a strided slice can round differently in the last
            # bit, and a group's scores must not depend on the other groups
            scores = torch.sigmoid(logits_l.contiguous()).flatten()
            candidates = torch.where(scores > self.score_thresh)[0]
            scores = scores[candidates]
            scores, order = scores.topk(det_utils._topk_min(candidates, self.topk_candidates, 0))
            candidates = candidates[order]
            anchor_idx = torch.div(candidates, k, rounding_mode="floor")
            boxes = self.box_coder.decode_single(regression_l[anchor_idx], anchors_l[anchor_idx])
            boxes_l.append(box_ops.clip_boxes_to_image(boxes, image_shape))
            scores_l.append(scores)
            labels_l.append(candidates % k)
        boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]


def caps_per_step(cfg: dict) -> bool:
    """``model.caps_per_step`` resolved: ``auto`` is on for ``branch`` (so that a ``branch`` step
    leaves every old detection as it was) and off otherwise."""
    value = cfg["model"].get("caps_per_step", "auto")
    check_choice("model.caps_per_step", value, ("auto", True, False))
    if value == "auto":
        return cfg["incremental"]["method"] == "branch"
    return bool(value)


def build_model(mcfg: dict, classes_per_step: Sequence[int], towers: Sequence[int] | None = None,
                per_step_caps: bool = False, from_checkpoint: bool = False,
                fpns: Sequence[int] | None = None,
                bodies: Sequence[int] | None = None) -> RetinaNet:
    """A RetinaNet predicting ``sum(classes_per_step)`` classes, head laid out per step.

    ``towers``: the classification tower of each step (``branch`` steps have their own);
    ``fpns``: the FPN each tower reads (``branch_from: fpn`` towers have their own);
    ``bodies``: the body each FPN reads (``branch_from: backbone`` FPNs have their own);
    ``per_step_caps``: an :class:`IncrementalRetinaNet`; ``from_checkpoint``: the caller loads
    trained weights (see :func:`build_backbone`)."""
    backbone = build_backbone(mcfg, from_checkpoint)
    num_levels = 5  # P3-P5 from the backbone, P6-P7 on top
    anchors = build_anchor_generator(mcfg, num_levels)
    head = IncrementalHead(backbone.out_channels, anchors.num_anchors_per_location()[0],
                           classes_per_step, num_convs=int(mcfg["head_convs"]),
                           norm=mcfg["head_norm"], prior_probability=mcfg["prior_probability"],
                           towers=towers, fpns=fpns)
    num_fpns = head.classification_head.num_fpns
    bodies = check_fpn_bodies(bodies if bodies is not None else [0] * num_fpns, num_fpns)
    for b, prev in zip(bodies[1:], bodies):
        backbone.add_branch(new_body=b != prev)
    cls = IncrementalRetinaNet if per_step_caps else RetinaNet
    normalise = {k: mcfg[k] for k in ("image_mean", "image_std") if mcfg.get(k) is not None}
    model = cls(backbone, num_classes=sum(classes_per_step), min_size=mcfg["min_size"],
                max_size=mcfg["max_size"], anchor_generator=anchors, head=head,
                score_thresh=mcfg["score_thresh"], nms_thresh=mcfg["nms_thresh"],
                detections_per_img=mcfg["detections_per_img"],
                topk_candidates=mcfg["topk_candidates"],
                fg_iou_thresh=mcfg["fg_iou_thresh"], bg_iou_thresh=mcfg["bg_iou_thresh"],
                **normalise)
    if per_step_caps:
        model.class_groups = list(classes_per_step)
    return model


def grow_model(model: RetinaNet, num_new: int, new_tower: bool = False,
               new_fpn: bool = False, new_body: bool = False) -> None:
    """Add ``num_new`` classes to the head (``new_tower``: on a tower of their own;
    ``new_fpn``: that tower reads a copy of the latest FPN, added to the backbone;
    ``new_body``: that FPN reads a copy of the latest body)."""
    if new_fpn:
        model.backbone.add_branch(new_body)
    model.head.classification_head.grow(num_new, new_tower, new_fpn)
    if isinstance(model, IncrementalRetinaNet):
        model.class_groups = head_layout(model)


def freeze_all_but(model: RetinaNet, trainable: Sequence[nn.Module]) -> None:
    """Only the parameters of ``trainable`` keep ``requires_grad``; norm layers left without a
    trainable parameter keep their statistics (:func:`keep_frozen_norms`)."""
    keep = {id(p) for m in trainable for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def keep_frozen_norms(model: nn.Module) -> None:
    """Put batch norms whose parameters are all frozen in eval mode (call after ``train()``):
    frozen layers must not move their running statistics either."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and \
                not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def head_layout(model: RetinaNet) -> list[int]:
    return list(model.head.classification_head.classes_per_step)


def head_towers(model: RetinaNet) -> list[int]:
    return list(model.head.classification_head.tower_of_step)


def head_fpns(model: RetinaNet) -> list[int]:
    return list(model.head.classification_head.fpn_of_tower)


def fpn_bodies(model: RetinaNet) -> list[int]:
    backbone = model.backbone
    return backbone.fpn_bodies() if isinstance(backbone, IncrementalBackbone) else [0]


def head_record(model: RetinaNet) -> dict:
    """What a checkpoint records of the head's layout (:mod:`incdet.model.checkpoint`)."""
    return {"head_layout": head_layout(model), "head_towers": head_towers(model),
            "head_fpns": head_fpns(model), "fpn_bodies": fpn_bodies(model)}


def batch_transform(transform, images: list[Tensor], targets: list[dict] | None = None):
    """``transform(images, targets)`` (torchvision's ``GeneralizedRCNNTransform``: normalise,
    resize, pad into one batch) with a few operators for the whole batch instead of several per
    image, when that gives the same result: every image of one shape, dtype and device, one
    target size (evaluation, or training with a single ``min_size``), no fixed size, targets
    with boxes but no masks or keypoints, eager mode. Otherwise, or under tracing or scripting,
    it is ``transform`` itself. Targets are shallow copies (the input is not modified)."""
    if not _batchable(transform, images, targets):
        return transform(images, targets)
    if transform.training:  # torchvision draws each image's size (one choice here): draw as
        # many random numbers, so that the random stream, and so training, stay the same
        torch.empty(len(images)).uniform_(0.0, 1.0)
    x = torch.stack(images)
    mean, std = _normalisation(tuple(transform.image_mean), tuple(transform.image_std), x.dtype,
                               x.device)
    x.sub_(mean).div_(std)  # in place on the fresh stack: no batch-sized temporaries
    h, w = x.shape[-2:]
    scale = min(float(transform.min_size[-1]) / min(h, w), float(transform.max_size) / max(h, w))
    if scale != 1.0:  # at scale 1 bilinear resizing returns its input unchanged
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear",
                                            recompute_scale_factor=True, align_corners=False)
    nh, nw = x.shape[-2:]
    step = float(transform.size_divisible)
    ph, pw = int(math.ceil(nh / step) * step), int(math.ceil(nw / step) * step)
    if (ph, pw) != (nh, nw):
        padded = x.new_zeros((x.shape[0], x.shape[1], ph, pw))
        padded[:, :, :nh, :nw].copy_(x)
        x = padded
    if targets is not None:
        targets = [dict(t) for t in targets]
        if (nh, nw) != (h, w):  # the ratios as torchvision computes them (float32 division)
            dtype, device = targets[0]["boxes"].dtype, targets[0]["boxes"].device
            ratio = (torch.tensor([nw, nh, nw, nh], dtype=torch.float32) /
                     torch.tensor([w, h, w, h], dtype=torch.float32)).tolist()
            ratio = host_to_device(ratio, dtype, device)  # float32 values, exact in dtype
            for t in targets:
                t["boxes"] = t["boxes"] * ratio
    return ImageList(x, [(int(nh), int(nw))] * x.shape[0]), targets


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device):
    """The (3, 1, 1) mean and std of a transform on ``device``, made once (not at every
    iteration)."""
    return (host_to_device(mean, dtype, device)[:, None, None],
            host_to_device(std, dtype, device)[:, None, None])


def _batchable(transform, images: list[Tensor], targets: list[dict] | None) -> bool:
    if torch.jit.is_scripting() or torchvision._is_tracing() or not images:
        return False
    if transform.fixed_size is not None or (transform.training and (
            len(transform.min_size) != 1 or getattr(transform, "_skip_resize", False))):
        return False
    first = images[0]
    if first.dim() != 3 or not first.is_floating_point() or any(
            im.shape != first.shape or im.dtype != first.dtype or im.device != first.device
            for im in images):
        return False
    return targets is None or (len(targets) == len(images) and all(
        "boxes" in t and "masks" not in t and "keypoints" not in t for t in targets))


def forward_train(model: RetinaNet, images: list[torch.Tensor], targets: list[dict] | None):
    """The training-time forward pass, returning what the losses need.

    Returns ``(head_outputs, anchors, targets, image_list)``: ``head_outputs["cls_logits"]``
    (N, HWA, K), ``["bbox_regression"]`` (N, HWA, 4), ``anchors`` a list of (HWA, 4), and the
    targets resized like the images.
    """
    image_list, targets = batch_transform(model.transform, images, targets)
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = batch_anchors(model.anchor_generator, image_list, features)
    return head_outputs, anchors, targets, image_list


# generator -> {(padded image size, feature sizes, dtype, device): anchors of one image}
_ANCHOR_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ANCHOR_CACHE_SIZE = 16  # shapes kept per generator (COCO batches come in many padded sizes)


def batch_anchors(generator: AnchorGenerator, image_list, features: list[Tensor]) -> list[Tensor]:
    """``generator(image_list, features)``: the anchors of every image of the batch. They depend
    only on the padded batch size and the feature sizes (the same tensor for every image), so
    they are computed once per shape and kept (up to :data:`ANCHOR_CACHE_SIZE` shapes per
    generator; the oldest goes first) instead of costing about a hundred operators at every
    iteration. A generator's sizes and ratios must not be changed after its first call."""
    key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in features),
           features[0].dtype, features[0].device)
    cache = _ANCHOR_CACHE.setdefault(generator, {})
    anchors = cache.get(key)
    if anchors is None:
        one = ImageList(image_list.tensors[:1], list(image_list.image_sizes[:1]))
        anchors = generator(one, [f[:1] for f in features])[0]
        if len(cache) >= ANCHOR_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = anchors
    return [anchors] * len(image_list.image_sizes)


def features_of(model: RetinaNet, image_list) -> OrderedDict:
    """FPN features of already-transformed images (for RoI features and the teacher)."""
    return model.backbone(image_list.tensors)
