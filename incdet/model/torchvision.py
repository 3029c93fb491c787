"""Conversion between incdet's RetinaNet and torchvision's, both ways.

* **incdet -> torchvision** (:func:`to_torchvision`): the per-step classifier convs of a grown
  head are fused into the single ``cls_logits`` conv of torchvision's
  ``RetinaNetClassificationHead`` (weights copied into the anchor-major channel layout
  ``anchor * K + class``), so a grown model is a stock torchvision RetinaNet and costs nothing
  extra at inference. A model with ``branch`` steps has several classification towers: its head
  is a :class:`BranchedClassificationHead` (a subclass of torchvision's), one fused classifier per
  tower.
* **torchvision -> incdet** (:func:`import_model`): a trained torchvision RetinaNet's settings
  are read from the detector itself (:func:`settings_of`): backbone (resnet18 / 34 / 50, or
  mobilenet_v3_large with incdet's FPN stages), FPN width and where P6 comes from, head depth and
  norm, anchors (sizes per level as they are), image sizes and normalisation, the
  post-processing thresholds and caps, and the box loss of the regression head. Its weights are
  renamed into incdet's layout (:func:`convert_state`); the backbone's norms keep their
  statistics frozen, computed as the detector computed them: ``model.norm: frozen``
  (``FrozenBatchNorm2d``, torchvision's v1 detectors) or ``frozen_eval`` (``BatchNorm2d`` in eval
  mode, torchvision's ``_v2``), and its first two stages stay frozen (``model.trainable_layers:
  3``, torchvision's default for trained detectors).
* **Classes** of a torchvision detector (:func:`slot_classes`): output slot ``i`` is class
  ``slots[i]`` (``{id, name}``, or None for a slot that is no class: torchvision's COCO weights
  have 91 slots indexed by category id, with ``__background__`` and ``N/A`` slots that never
  fire). Only real classes are kept, in slot order (not re-sorted: torchvision's class-wise NMS
  offsets boxes by label, so permuting labels could change its rounding).

Detections of an imported model equal the stock detector's in eval mode, and a converted model's
equal incdet's up to float rounding; the tests check both. Writing an imported detector as step 0
of an experiment is :mod:`incdet.experiment.importer`'s job.
"""
import copy
import json
import re
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import Conv2dNormActivation

from incdet.base.config import DEFAULTS
from incdet.base.errors import UserError, check_choice
from incdet.model.builder import (
    build_backbone,
    build_model,
    cached_weights_file,
    load_state_dict_file,
)
from incdet.model.heads import fpn_features, group_norm


def fuse_classifiers(classifiers: Sequence[nn.Conv2d], sizes: Sequence[int],
                     num_anchors: int) -> nn.Conv2d:
    """One conv equal to per-step classifier convs (``sizes[s]`` classes each) that read the same
    tower, in torchvision's anchor-major channel layout."""
    a, k = num_anchors, sum(sizes)
    first = classifiers[0]
    fused = nn.Conv2d(first.in_channels, a * k, first.kernel_size, padding=first.padding)
    fused = fused.to(first.weight.device, first.weight.dtype)
    with torch.no_grad():
        off = 0
        for clf, ks_ in zip(classifiers, sizes):
            w = clf.weight.view(a, ks_, *clf.weight.shape[1:])
            b = clf.bias.view(a, ks_)
            fused.weight.view(a, k, *w.shape[2:])[:, off:off + ks_] = w
            fused.bias.view(a, k)[:, off:off + ks_] = b
            off += ks_
    return fused


class TowerClassifier(nn.Module):
    """One classification tower and the fused classifier of the steps that read it."""

    def __init__(self, conv: nn.Module, cls_logits: nn.Conv2d, num_anchors: int,
                 num_classes: int, fpn: int = 0):
        super().__init__()
        self.conv = conv
        self.cls_logits = cls_logits
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.fpn = fpn  # the FPN it reads (a backbone with FPN copies: heads.fpn_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, A, K_tower, H, W)."""
        out = self.cls_logits(self.conv(fpn_features(x, self.fpn, self.cls_logits.in_channels)))
        n, _, h, w = out.shape
        return out.view(n, self.num_anchors, self.num_classes, h, w)


class BranchedClassificationHead(RetinaNetClassificationHead):
    """torchvision's ``RetinaNetClassificationHead`` with several conv towers (a model with
    ``branch`` steps): ``towers[b]`` is a :class:`TowerClassifier`; the logits of the towers are
    concatenated in class order into the same (N, HWA, K) output. What differs from the stock
    head: ``conv`` and ``cls_logits`` are replaced by ``towers`` (so its state dict has other
    keys); ``forward`` and the inherited ``compute_loss`` take and return the same things."""

    def __init__(self, towers: Sequence[TowerClassifier], num_anchors: int):
        num_classes = sum(t.num_classes for t in towers)
        first = towers[0].cls_logits
        super().__init__(first.in_channels, num_anchors, num_classes)
        del self.conv, self.cls_logits
        self.towers = nn.ModuleList(towers)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        levels = []
        for features in x:
            per_tower = [tower(features) for tower in self.towers]
            logits = torch.cat(per_tower, dim=2)  # (N, A, K, H, W)
            n, a, k, h, w = logits.shape
            levels.append(logits.permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        return torch.cat(levels, dim=1)


class FirstFPNRegressionHead(nn.Module):
    """A box subnet that reads FPN 0 of a backbone with FPN copies
    (``incremental.branch_from: fpn``): ``head`` on :func:`fpn_features` ``(x, 0, C)``."""

    def __init__(self, head: RetinaNetRegressionHead, channels: int):
        super().__init__()
        self.head = head
        self.channels = channels

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return self.head([fpn_features(f, 0, self.channels) for f in x])

    def compute_loss(self, targets: list[dict[str, torch.Tensor]],
                     head_outputs: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     matched_idxs: list[torch.Tensor]) -> torch.Tensor:
        """torchvision's box loss (it reads the head's outputs, not the features)."""
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def torchvision_tower(flat: nn.Sequential) -> nn.Sequential:
    """incdet's flat conv tower (conv, [norm,] ReLU, ...) as torchvision builds it: one
    ``Conv2dNormActivation`` per conv, the same modules inside (state-dict keys ``<i>.0.weight``,
    ``<i>.1.weight``: a torchvision RetinaNet's)."""
    blocks, current = [], []
    for layer in flat:
        current.append(layer)
        if isinstance(layer, nn.ReLU):
            blocks.append(current)
            current = []
    out = []
    for layers in blocks:
        conv, *norm, relu = layers
        block = Conv2dNormActivation(conv.in_channels, conv.out_channels,
                                     norm_layer=(lambda c: nn.GroupNorm(1, c)) if norm else None)
        block[0] = conv
        if norm:
            block[1] = norm[0]
        out.append(block)
    return nn.Sequential(*out)


def torchvision_classification_head(head) -> RetinaNetClassificationHead:
    """torchvision's head equal to an ``IncrementalClassificationHead``: the stock one (per-step
    classifiers fused) when every step shares one tower, else a
    :class:`BranchedClassificationHead`."""
    a = head.num_anchors
    towers = []
    for b, tower in enumerate(head.towers()):
        steps = [s for s, tb in enumerate(head.tower_of_step) if tb == b]
        sizes = [head.classes_per_step[s] for s in steps]
        towers.append(TowerClassifier(torchvision_tower(tower), fuse_classifiers(
            [head.classifiers[s] for s in steps], sizes, a), a, sum(sizes), head.fpn_of_tower[b]))
    if len(towers) > 1:
        return BranchedClassificationHead(towers, a)
    cls = RetinaNetClassificationHead(head.in_channels, a, head.num_classes)
    cls.conv = towers[0].conv
    cls.cls_logits = towers[0].cls_logits
    return cls


def to_torchvision(model: RetinaNet) -> RetinaNet:
    """A copy of ``model`` whose head is torchvision's ``RetinaNetHead`` (per-step classifiers
    fused; a model with ``branch`` steps gets a :class:`BranchedClassificationHead`); outputs
    are identical up to float rounding. A model with per-step caps stays an
    :class:`~incdet.model.builder.IncrementalRetinaNet` (a ``RetinaNet`` subclass whose
    post-processing applies the caps per step group)."""
    model = copy.deepcopy(model)
    inc = model.head
    cls_src, reg_src = inc.classification_head, inc.regression_head
    head = RetinaNetHead(cls_src.in_channels, cls_src.num_anchors, cls_src.num_classes)
    head.classification_head = torchvision_classification_head(cls_src)
    reg = head.regression_head
    assert isinstance(reg, RetinaNetRegressionHead)
    reg.conv = torchvision_tower(reg_src.conv)
    reg.bbox_reg = reg_src.bbox_reg
    if cls_src.num_fpns > 1:
        head.regression_head = FirstFPNRegressionHead(reg, cls_src.in_channels)
    model.head = head.to(next(model.parameters()).device)
    return model.eval()


NOT_A_CLASS = ("__background__", "N/A")


# torchvision's RetinaNet builders by their weights enum, and the layouts --arch can build:
# (backbone, P6 input, head norm)
WEIGHTS_ARCH = {"RetinaNet_ResNet50_FPN_Weights": "retinanet_resnet50_fpn",
                "RetinaNet_ResNet50_FPN_V2_Weights": "retinanet_resnet50_fpn_v2"}


ARCHS = {f"retinanet_{b}_fpn{v}": (b, "p5" if not v else "c5", "none" if not v else "groupnorm")
         for b in ("resnet18", "resnet34", "resnet50") for v in ("", "_v2")}


INCDET_ARCH = "incdet"  # --arch incdet: the layout the config's model settings describe


_RESNETS = {("BasicBlock", (2, 2, 2, 2)): "resnet18", ("BasicBlock", (3, 4, 6, 3)): "resnet34",
            ("Bottleneck", (3, 4, 6, 3)): "resnet50"}


def build_torchvision(arch: str, num_classes: int) -> RetinaNet:
    """A stock-layout torchvision RetinaNet of ``arch`` (random weights, frozen backbone norm).

    ``retinanet_resnet50_fpn[_v2]`` come from torchvision's own builders; the resnet18 / 34
    variants are assembled the same way (torchvision builds no RetinaNet on them)."""
    check_choice("--arch", arch, tuple(ARCHS))
    backbone_name, p6_from, head_norm = ARCHS[arch]
    detection = torchvision.models.detection
    if backbone_name == "resnet50":
        builder = getattr(detection, arch)
        return builder(weights=None, weights_backbone=None, num_classes=num_classes)
    body = getattr(torchvision.models, backbone_name)(weights=None)
    c5 = body.fc.in_features
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [c5 // 4, c5 // 2, c5], 256,
                               extra_blocks=LastLevelP6P7(256 if p6_from == "p5" else c5, 256))
    model = RetinaNet(backbone, num_classes)
    if head_norm == "groupnorm":
        model.head = RetinaNetHead(256, model.anchor_generator.num_anchors_per_location()[0],
                                   num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))
        model.head.regression_head._loss_type = "giou"
    return model


def freeze_batch_norms(module: nn.Module) -> None:
    """``BatchNorm2d`` layers -> ``FrozenBatchNorm2d`` with the same statistics (what torchvision
    builds for a detector trained with frozen norms, e.g. ``retinanet_resnet50_fpn``'s COCO
    weights)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child)


def _not_expressible(what: str) -> UserError:
    return UserError(f"this RetinaNet cannot be imported: {what}. incdet expresses torchvision's "
                     "retinanet_resnet50_fpn / _v2 layouts with resnet18/34/50 (FPN on C3-C5) "
                     "or incdet's mobilenet_v2 / mobilenet_v3_large / _small FPNs")


# the MobileNet bodies incdet builds (backbone, reduced_tail), each at width 1
MOBILENET_SHAPES = (("mobilenet_v3_large", False), ("mobilenet_v3_large", True),
                    ("mobilenet_v2", False), ("mobilenet_v3_small", False),
                    ("mobilenet_v3_small", True))


def _backbone_settings(backbone: nn.Module) -> dict:
    body = getattr(backbone, "body", None)
    if not isinstance(backbone, BackboneWithFPN) or body is None:
        raise _not_expressible(f"its backbone is a {type(backbone).__name__}, not an FPN backbone")
    returned = dict(getattr(body, "return_layers", {}))
    if hasattr(body, "layer4"):
        blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
        kind = type(body.layer1[0]).__name__
        name = _RESNETS.get((kind, blocks))
        if name is None:
            raise _not_expressible(f"its ResNet has {kind} blocks {list(blocks)}")
        if returned != {"layer2": "0", "layer3": "1", "layer4": "2"}:
            raise _not_expressible(f"its FPN reads {sorted(returned)}, not layer2-layer4")
        settings = {"backbone": name}
    else:
        settings = None
        for name, tail in MOBILENET_SHAPES:
            mcfg = dict(DEFAULTS["model"], backbone=name, width_mult=1.0, reduced_tail=tail,
                        fpn_channels=backbone.out_channels)
            candidate = build_backbone(mcfg)
            if candidate.body.return_layers == returned and \
                    _shapes(candidate.body) == _shapes(body):
                settings = {"backbone": name, "width_mult": 1.0, "reduced_tail": tail}
                break
        if settings is None:
            raise _not_expressible("its backbone is neither a ResNet nor one of incdet's "
                                   "MobileNet FPNs on three stages (torchvision's "
                                   "mobilenet_backbone reads two)")
    fpn = backbone.fpn
    if len(fpn.inner_blocks) != 3:
        raise _not_expressible(f"its FPN has {len(fpn.inner_blocks)} inputs, not 3")
    if any(not isinstance(m, (nn.Conv2d, nn.Sequential)) or
           (isinstance(m, nn.Sequential) and len(m) > 1) for m in fpn.inner_blocks):
        raise _not_expressible("its FPN convs have norm layers")
    extra = fpn.extra_blocks
    if not isinstance(extra, LastLevelP6P7):
        raise _not_expressible(f"its FPN's extra levels are {type(extra).__name__}, not P6-P7")
    norms = {type(m) for m in body.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))}
    if len(norms) != 1 or not norms <= {nn.BatchNorm2d, FrozenBatchNorm2d}:
        raise _not_expressible(f"its backbone norms are {sorted(n.__name__ for n in norms)}")
    settings.update(fpn_channels=int(backbone.out_channels), fpn_norm="none",
                    p6_from="p5" if extra.use_P5 else "c5", trainable_layers=3, weights=None,
                    norm="frozen" if norms == {FrozenBatchNorm2d} else "frozen_eval")
    return settings


def _shapes(module: nn.Module) -> list[tuple]:
    return [tuple(p.shape) for p in module.parameters()]


def _tower_settings(conv: nn.Sequential, where: str) -> tuple[int, str]:
    norms = set()
    for block in conv:
        layers = list(block) if isinstance(block, nn.Sequential) else [block]
        norm = [m for m in layers if not isinstance(m, (nn.Conv2d, nn.ReLU))]
        if not norm:
            norms.add("none")
        elif len(norm) == 1 and isinstance(norm[0], nn.GroupNorm) and \
                norm[0].num_groups == group_norm(norm[0].num_channels).num_groups:
            norms.add("groupnorm")
        else:
            raise _not_expressible(f"its {where} uses {[type(m).__name__ for m in norm]}")
    if len(norms) > 1:
        raise _not_expressible(f"its {where} mixes norm layers")
    return len(conv), norms.pop() if norms else "none"


def settings_of(model: RetinaNet) -> tuple[dict, dict]:
    """incdet's ``model`` settings and ``loss`` settings that express ``model``."""
    if not isinstance(model, RetinaNet):
        raise UserError(f"expected a torchvision RetinaNet, got a {type(model).__name__}")
    mcfg = _backbone_settings(model.backbone)
    cls_head, reg_head = model.head.classification_head, model.head.regression_head
    convs, norm = _tower_settings(cls_head.conv, "classification head")
    if _tower_settings(reg_head.conv, "regression head") != (convs, norm):
        raise _not_expressible("its regression and classification towers differ")
    gen = model.anchor_generator
    ratios = {tuple(float(r) for r in level) for level in gen.aspect_ratios}
    if len(ratios) != 1 or len(gen.sizes) != 5:
        raise _not_expressible("its anchors do not use 5 levels with one set of aspect ratios")
    if tuple(model.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise _not_expressible(f"its box coder weights are {model.box_coder.weights}")
    transform = model.transform
    min_size = [int(v) for v in transform.min_size]
    mcfg.update(
        head_convs=convs, head_norm=norm,
        anchor_sizes=[[float(v) for v in level] for level in gen.sizes],
        anchor_scales=len(gen.sizes[0]), aspect_ratios=list(ratios.pop()),
        fg_iou_thresh=float(model.proposal_matcher.high_threshold),
        bg_iou_thresh=float(model.proposal_matcher.low_threshold),
        min_size=min_size[0] if len(min_size) == 1 else min_size,
        max_size=int(transform.max_size),
        image_mean=[float(v) for v in transform.image_mean],
        image_std=[float(v) for v in transform.image_std],
        score_thresh=float(model.score_thresh), nms_thresh=float(model.nms_thresh),
        detections_per_img=int(model.detections_per_img),
        topk_candidates=int(model.topk_candidates))
    loss_type = getattr(reg_head, "_loss_type", "l1")
    lcfg = {"box": loss_type} if loss_type in ("giou", "l1", "smooth_l1") else {}
    return mcfg, lcfg


def _tower_key(rest: str, norm: str) -> str:
    """torchvision's ``conv.<i>.<j>.<p>`` (block i: conv j=0, norm j=1) -> incdet's flat
    ``conv.<k>.<p>`` (per block: conv, [norm,] ReLU)."""
    m = re.match(r"conv\.(\d+)\.(\d+)\.(.+)$", rest)
    if m is None:
        return rest
    i, j, param = int(m.group(1)), int(m.group(2)), m.group(3)
    per_block = 3 if norm == "groupnorm" else 2
    return f"conv.{i * per_block + j}.{param}"


def convert_state(state: dict, mcfg: dict, num_anchors: int, keep: Sequence[int]) -> dict:
    """torchvision RetinaNet state dict -> incdet's, keeping classifier slots ``keep`` (in that
    order) and dropping batch-norm counters (the backbone's norms are frozen)."""
    out = {}
    num_slots = None
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("head.classification_head.cls_logits."):
            num_slots = value.shape[0] // num_anchors
            per_anchor = value.view(num_anchors, num_slots, *value.shape[1:])
            kept = per_anchor[:, list(keep)].reshape(num_anchors * len(keep), *value.shape[1:])
            out["head.classification_head.classifiers.0." + key.rsplit(".", 1)[1]] = kept.clone()
            continue
        for prefix in ("head.classification_head.", "head.regression_head."):
            if key.startswith(prefix):
                key = prefix + _tower_key(key[len(prefix):], mcfg["head_norm"])
        out[key] = value
    return out


def slot_classes(num_slots: int, classes, source: str) -> list[dict | None]:
    """The class of each output slot, from a list of ``{id, name}`` (one per slot; names in
    :data:`NOT_A_CLASS` mark slots that are no class), incdet's export metadata
    (``category_ids`` and ``names`` in slot order) or a COCO annotation dict (its
    ``categories``; torchvision's convention: the slot of a class is its category id)."""
    if isinstance(classes, dict) and "category_ids" in classes and "names" in classes:
        # the metadata incdet's export writes beside a model (OUT.json): one entry per slot
        pairs = zip(classes["category_ids"], classes["names"])
        classes = [{"id": i, "name": n} for i, n in pairs]
    if isinstance(classes, dict) and "categories" in classes:
        cats = classes["categories"]
        if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c and "name" in c
                                                 for c in cats):
            raise UserError(f"{source}: 'categories' must be a list of {{id, name}}")
        top = max((int(c["id"]) for c in cats), default=-1)
        if top >= num_slots:
            raise UserError(f"{source}: category id {top} has no output slot: the detector has "
                            f"{num_slots} slots (ids 0..{num_slots - 1}) but the file's ids reach "
                            f"{top}; give a list of {num_slots} {{id, name}} instead, one per slot")
        by_id = {int(c["id"]): {"id": int(c["id"]), "name": str(c["name"])} for c in cats}
        return [by_id.get(i) for i in range(num_slots)]
    if not isinstance(classes, list):
        raise UserError(f"{source}: expected a list of {{id, name}} (one per output slot) or a "
                        "COCO annotation file with 'categories'")
    if len(classes) != num_slots:
        raise UserError(f"{source}: {len(classes)} classes given but the detector has {num_slots} "
                        "output slots; give one {id, name} per slot (name '__background__' or "
                        "'N/A' for a slot that is no class)")
    out: list[dict | None] = []
    for i, c in enumerate(classes):
        if isinstance(c, str):
            c = {"id": i, "name": c}
        if not isinstance(c, dict) or "name" not in c:
            raise UserError(f"{source}: entry {i} ({c!r}) is not an {{id, name}} mapping")
        if str(c["name"]) in NOT_A_CLASS:
            out.append(None)
            continue
        if not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise UserError(f"{source}: entry {i} ({c!r}) needs an integer id")
        out.append({"id": int(c["id"]), "name": str(c["name"])})
    ids = [c["id"] for c in out if c is not None]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source}: a category id appears twice")
    if not ids:
        raise UserError(f"{source}: no real class among the {num_slots} slots")
    return out


def read_classes(path: str | Path) -> object:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--classes {path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--classes {path}: not valid JSON ({e})") from None


def _num_anchors_and_slots(state: dict, source: str) -> tuple[int, int]:
    cls_key, reg_key = ("head.classification_head.cls_logits.weight",
                        "head.regression_head.bbox_reg.weight")
    if cls_key not in state or reg_key not in state:
        if any(k.startswith(("rpn.", "roi_heads.")) for k in state):
            kind = "a Faster/Mask R-CNN"
        elif any(k.startswith(("fc.", "classifier.")) for k in state):
            kind = "an image classifier"
        else:
            kind = "another architecture"
        raise UserError(f"{source}: not a RetinaNet state dict (no {cls_key}; it looks like "
                        f"{kind}); give the state_dict of a torchvision RetinaNet")
    anchors = state[reg_key].shape[0] // 4
    slots, rem = divmod(state[cls_key].shape[0], anchors)
    if rem or anchors == 0:
        raise UserError(f"{source}: classifier width {state[cls_key].shape[0]} is not a multiple "
                        f"of the {anchors} anchors of its box head")
    return anchors, slots


def torchvision_from_weights(name: str) -> tuple[RetinaNet, list[dict | None], str]:
    """The stock detector of a torchvision weights name, loaded from the local cache, with its
    slot classes from the weights' ``meta["categories"]``."""
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"--weights {name!r}: not a torchvision weights name such as "
                        "'RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1'") from None
    arch = WEIGHTS_ARCH.get(type(weights).__name__)
    if arch is None:
        raise UserError(f"--weights {name}: not the weights of a torchvision RetinaNet (choose "
                        f"from {', '.join(WEIGHTS_ARCH)})")
    path = cached_weights_file(weights, "--weights", "pass --state-dict FILE --arch " + arch)
    names = list(weights.meta["categories"])
    slots = [None if n in NOT_A_CLASS else {"id": i, "name": n} for i, n in enumerate(names)]
    model = load_torchvision(path, arch, str(path))
    return model, slots, arch


def load_torchvision(path: str | Path, arch: str, source: str,
                     model_cfg: dict | None = None) -> RetinaNet:
    """A stock-layout RetinaNet of ``arch`` with the state dict in ``path`` (data-only).

    ``arch="incdet"``: the torchvision RetinaNet that incdet's ``model_cfg`` describes, in the
    layout :func:`incdet.model.torchvision.to_torchvision` gives it (what ``tools/export.py --format
    state_dict`` saves)."""
    state = load_state_dict_file(Path(path), source)
    anchors, slots = _num_anchors_and_slots(state, source)
    if arch == INCDET_ARCH:
        # the file holds every weight: frozen norms need no ImageNet file to be built
        model = to_torchvision(build_model(dict(model_cfg or {}, weights=None), [slots],
                                           from_checkpoint=True))
    else:
        model = build_torchvision(arch, slots)
    expected = model.head.classification_head.num_anchors
    if anchors != expected:
        raise UserError(f"{source}: the head has {anchors} anchors per location but {arch} has "
                        f"{expected}; give the --arch it was built with")
    if not any(k.endswith("num_batches_tracked") for k in state):
        freeze_batch_norms(model)  # saved from a model with frozen norms (no BN counters)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shapes differ: " + ", ".join(wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        fix = ("the config's model settings must be the detector's (an incdet export lists "
               "them in its OUT.json, under \"model\")") if arch == INCDET_ARCH else \
            "give the --arch the detector was built with"
        raise UserError(f"{source}: does not fit {arch}: {'; '.join(parts)}; {fix}")
    model.load_state_dict(state)
    return model.eval()


def import_model(model: RetinaNet, slots: Sequence[dict | None]):
    """``(model_cfg, loss_cfg, categories, incdet_state)`` of a torchvision RetinaNet whose output
    slot ``i`` is class ``slots[i]``; categories in slot order."""
    num_slots = model.head.classification_head.num_classes
    if len(slots) != num_slots:
        raise UserError(f"{len(slots)} classes given but the detector has {num_slots} output "
                        "slots")
    mcfg, lcfg = settings_of(model)
    keep = [i for i, c in enumerate(slots) if c is not None]
    categories = [dict(slots[i]) for i in keep]
    state = convert_state(model.state_dict(), mcfg,
                          model.head.classification_head.num_anchors, keep)
    return mcfg, lcfg, categories, state
