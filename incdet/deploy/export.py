"""Detectors for applications: a plain torchvision RetinaNet, TorchScript and ONNX files.

* :func:`to_torchvision` fuses the per-step classifier convs of a grown head into the single
  ``cls_logits`` conv of torchvision's ``RetinaNetClassificationHead`` (weights copied into the
  anchor-major channel layout ``anchor * K + class``), so a grown model is a stock torchvision
  RetinaNet and costs nothing extra at inference. A model with ``branch`` steps has several
  classification towers: its head is a :class:`BranchedClassificationHead` (a subclass of
  torchvision's), one fused classifier per tower.
* :func:`load_detector` rebuilds that model from an incdet checkpoint with its class metadata
  attached (``model.incdet_meta``); :class:`Detector` wraps it for ``predict(image or path)``.
  Both run on the device they are given (default ``auto``: CUDA when available, else CPU), never
  on the ``train.device`` saved in the checkpoint.
* :func:`export` writes ``F`` (TorchScript or ONNX) and ``F.json`` (metadata). The exported
  program takes one RGB float image in [0, 1], shape (3, H, W), and returns ``boxes`` (R, 4) xyxy in
  input pixels, ``scores`` (R,) and ``category_ids`` (R,): dataset category ids, not label indices.
  Export checks itself: it runs the written file (``torch.jit.load`` / onnxruntime) on sample
  images of several sizes and fails with the numbers if it disagrees with the eager model.

ONNX uses the TorchScript-based exporter (``dynamo=False``) at opset 17 with dynamic height and
width; the dynamo exporter cannot export torchvision's ``batched_nms`` (pytorch/vision#9306).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json

# state_dict: the weights of the torchvision RetinaNet (torch.save(model.state_dict())), for a
# plain torchvision user or for tools/import_detector.py --arch incdet
FORMATS = ("torchscript", "onnx", "state_dict")
INPUT = {"layout": "CHW", "channels": "RGB", "dtype": "float32", "range": [0.0, 1.0],
         "batch": "one image per call"}
OUTPUTS = ["boxes (R, 4) xyxy in input pixels", "scores (R,)", "category_ids (R,) int64"]


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
                 num_classes: int):
        super().__init__()
        self.conv = conv
        self.cls_logits = cls_logits
        self.num_anchors = num_anchors
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, A, K_tower, H, W)."""
        out = self.cls_logits(self.conv(x))
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


def torchvision_tower(flat: nn.Sequential) -> nn.Sequential:
    """incdet's flat conv tower (conv, [norm,] ReLU, ...) as torchvision builds it: one
    ``Conv2dNormActivation`` per conv, the same modules inside (state-dict keys ``<i>.0.weight``,
    ``<i>.1.weight``: a torchvision RetinaNet's)."""
    from torchvision.ops.misc import Conv2dNormActivation

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
            [head.classifiers[s] for s in steps], sizes, a), a, sum(sizes)))
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
    model.head = head.to(next(model.parameters()).device)
    return model.eval()


def metadata(ckpt: dict) -> dict:
    """Class metadata of a checkpoint: output order, names and the step history."""
    n = sum(ckpt["head_layout"])
    order = [int(c) for c in ckpt["class_order"][:n]]
    names = {str(k): v for k, v in ckpt["names"].items()}
    return {"category_ids": order, "names": [names[str(c)] for c in order],
            "steps": [[int(c) for c in s] for s in ckpt["steps"][:ckpt["step"] + 1]],
            "step": int(ckpt["step"]), "method": ckpt.get("method"),
            "score_thresh": float(ckpt["config"]["model"].get("score_thresh", 0.05)),
            "input": INPUT, "outputs": OUTPUTS}


def load_detector(path: str | os.PathLike,
                  device: str | torch.device | None = "auto") -> RetinaNet:
    """A torchvision RetinaNet in eval mode from an incdet checkpoint (``step_<t>/checkpoint.pt``),
    ready for ``model([image])``, on ``device`` (``auto``: CUDA when available, else CPU).
    ``model.incdet_meta`` holds ``category_ids`` and ``names`` in label order (label ``i`` is
    category ``category_ids[i]``), the step history and the score threshold."""
    from incdet.experiment.step import model_from_checkpoint
    from incdet.model.checkpoint import load_checkpoint
    from incdet.train.engine import resolve_device

    device = resolve_device(device, "device")
    ckpt = load_checkpoint(path)
    model = to_torchvision(model_from_checkpoint(ckpt, source=path)).to(device)
    model.incdet_meta = metadata(ckpt)
    model.incdet_config = ckpt["config"]
    return model


class Detector:
    """``Detector(path).predict(image)`` -> ``[(category_id, name, score, [x0, y0, x1, y1])]``.

    ``image``: a file path, a PIL image, an HxWx3 uint8 array or a (3, H, W) float tensor in [0, 1].
    ``device``: where the model runs (``auto``: CUDA when available, else CPU; with a ``model``
    given, ``auto`` keeps it where it is).
    """

    def __init__(self, path: str | os.PathLike | None = None, model: RetinaNet | None = None,
                 device: str | torch.device | None = "auto", score_thresh: float | None = None):
        from incdet.train.engine import resolve_device

        if model is None:
            if path is None:
                raise ValueError("give a checkpoint path or a model from load_detector")
            model = load_detector(path, device)
        elif device is not None and device != "auto":
            model = model.to(resolve_device(device, "device"))
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.meta = model.incdet_meta
        self.score_thresh = self.meta["score_thresh"] if score_thresh is None else score_thresh

    @torch.no_grad()
    def predict(self, image) -> list[tuple[int, str, float, list[float]]]:
        tensor = as_image_tensor(image).to(self.device)
        out = self.model([tensor])[0]
        ids, names = self.meta["category_ids"], self.meta["names"]
        result = []
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(),
                                     out["scores"].tolist()):
            if score >= self.score_thresh:
                result.append((ids[label], names[label], score, box))
        return result


def as_image_tensor(image) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from incdet.data.dataset import read_image, to_tensor

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) RGB")
        return image.float()
    if isinstance(image, (str, os.PathLike)):
        return to_tensor(read_image(Path(image)))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"image array of shape {image.shape}: expected (H, W, 3) RGB")
        return to_tensor(image)
    raise UserError(f"cannot read an image from a {type(image).__name__}")


class ExportModule(nn.Module):
    """One image in, ``(boxes, scores, category_ids)`` out: the exported program."""

    def __init__(self, model: RetinaNet, category_ids: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("category_ids", torch.as_tensor(list(category_ids), dtype=torch.int64))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            _, detections = self.model([image])
        else:
            detections = self.model([image])
        det = detections[0]
        return det["boxes"], det["scores"], self.category_ids[det["labels"]]


def sample_images(sizes: Sequence[tuple[int, int]] = ((128, 128), (96, 160), (150, 110)),
                  seed: int = 0) -> list[torch.Tensor]:
    """Images of the built-in dataset's kind at several sizes, for export checks."""
    import numpy as np

    from incdet.data import synthetic
    from incdet.data.dataset import to_tensor

    out = []
    for i, (h, w) in enumerate(sizes):
        img, _ = synthetic.render_image(seed, 7, i, max(h, w))
        out.append(to_tensor(np.asarray(img)[:h, :w].copy()))
    return out


def compare(reference: Sequence[tuple], candidate: Sequence[tuple], rtol: float = 1e-3,
            atol: float = 1e-2) -> str | None:
    """None when two lists of ``(boxes, scores, ids)`` agree; otherwise a description."""
    for i, (ref, got) in enumerate(zip(reference, candidate)):
        rb, rs, ri = (torch.as_tensor(v).cpu() for v in ref)
        gb, gs, gi = (torch.as_tensor(v).cpu() for v in got)
        if rb.shape != gb.shape:
            return f"image {i}: {len(rb)} detections from the eager model, {len(gb)} exported"
        if not torch.equal(ri.long(), gi.long()):
            return f"image {i}: category ids differ"
        if len(rb):
            db = (rb.float() - gb.float()).abs()
            tol = atol + rtol * rb.float().abs()
            if (db > tol).any():
                return f"image {i}: boxes differ by up to {db.max().item():.4g} px"
            ds = (rs.float() - gs.float()).abs().max().item()
            if ds > 1e-4:
                return f"image {i}: scores differ by up to {ds:.3g}"
    return None


def export(ckpt_path: str | os.PathLike, fmt: str, out: str | os.PathLike,
           opset: int = 17, check_images: Sequence[torch.Tensor] | None = None,
           device: str | torch.device | None = "auto") -> dict:
    """Write ``out`` (TorchScript, ONNX or a torchvision state dict) and ``out.json``; returns
    the metadata written. The written file is run on sample images against the eager model
    first; a mismatch writes nothing.

    The file holds CPU weights (it loads on any machine). ``device`` (``auto``: CUDA when
    available, else CPU) is where a TorchScript file is checked against the eager model; an
    ONNX file is checked with onnxruntime's CPU provider, on CPU."""
    from incdet.train.engine import resolve_device

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_device = resolve_device(device, "device") if fmt == "torchscript" else \
        torch.device("cpu")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_detector(ckpt_path, "cpu")
    meta = dict(model.incdet_meta, format=fmt, file=out.name,
                source_checkpoint=str(ckpt_path))
    module = ExportModule(model, meta["category_ids"]).eval()
    images = list(check_images) if check_images is not None else sample_images()
    tmp = out.with_name(out.name + ".tmp")
    try:
        if fmt == "state_dict":
            got = _save_state_dict(model, tmp, images)
        elif fmt == "torchscript":
            with quiet_warnings():
                torch.jit.script(module).save(str(tmp))
                loaded = torch.jit.load(str(tmp), map_location=check_device)
                with torch.no_grad():
                    got = [loaded(img.to(check_device)) for img in images]
        else:
            _export_onnx(module, images[0], tmp, opset)
            got = run_onnx(tmp, images)
        module.to(check_device)  # the file is written: the eager reference runs beside it
        with torch.no_grad():
            reference = [module(img.to(check_device)) for img in images]
        problem = compare(reference, got)
        if problem is not None:
            raise UserError(f"{out}: the exported {fmt} model disagrees with the eager model "
                            f"({problem}); nothing was written")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta["checked_images"] = [list(img.shape[1:]) for img in images]
    atomic_write_json(out.with_name(out.name + ".json"), meta)
    return meta


def _save_state_dict(model: RetinaNet, path: Path, images: Sequence[torch.Tensor]) -> list:
    """Save ``model``'s state dict and rebuild it as a user would: the torchvision RetinaNet
    that the checkpoint's model settings describe (``import_detector --arch incdet``), the file
    loaded data-only. Returns that model's outputs on ``images``, to check against the eager
    model (a detector whose post-processing is not torchvision's, per-step caps or ``branch``
    towers, does not fit and is refused)."""
    from incdet.experiment.importer import INCDET_ARCH, load_torchvision

    torch.save(model.state_dict(), path)
    from incdet.base.config import with_defaults

    model_cfg = dict(with_defaults(model.incdet_config)["model"])
    try:
        rebuilt = load_torchvision(path, INCDET_ARCH, str(path), model_cfg)
    except UserError as err:
        raise UserError(f"--format state_dict: this detector is not a plain torchvision "
                        f"RetinaNet ({err}); export torchscript or onnx instead") from None
    module = ExportModule(rebuilt, model.incdet_meta["category_ids"]).eval()
    with torch.no_grad():
        return [module(img) for img in images]


@contextlib.contextmanager
def quiet_warnings():
    """Silence the deprecation notices of torch.jit and the tracer's warnings about Python
    values (both expected here: torchvision's detection models are scripted and traced as
    documented)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with quiet_warnings():
        torch.onnx.export(module, (example,), str(path), opset_version=opset,
                          input_names=["image"],
                          output_names=["boxes", "scores", "category_ids"],
                          dynamic_axes={"image": {1: "height", 2: "width"},
                                        "boxes": {0: "detections"}, "scores": {0: "detections"},
                                        "category_ids": {0: "detections"}},
                          dynamo=False)


def onnx_session(path: str | os.PathLike):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX export and inference need onnxruntime: pip install onnxruntime") \
            from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, images: Sequence[torch.Tensor]) -> list[tuple]:
    session = onnx_session(path)
    return [tuple(session.run(None, {"image": img.numpy()})) for img in images]


class Runner:
    """One image tensor in, ``(boxes, scores, category_ids)`` numpy arrays out, from an incdet
    checkpoint (eager), a TorchScript file or an ONNX file; ``meta`` is the class metadata.
    ``device`` (``auto``: CUDA when available, else CPU) runs checkpoints and TorchScript files;
    ONNX files run on onnxruntime's CPU provider."""

    def __init__(self, checkpoint: str | os.PathLike | None = None,
                 model: str | os.PathLike | None = None,
                 device: str | torch.device | None = "auto"):
        from incdet.train.engine import resolve_device

        if (checkpoint is None) == (model is None):
            raise UserError("give exactly one of --checkpoint and --model")
        if checkpoint is not None:
            self.device = resolve_device(device, "device")
            detector = load_detector(checkpoint, self.device)
            self.meta = detector.incdet_meta
            module = ExportModule(detector, self.meta["category_ids"]).to(self.device).eval()
            self._fn = lambda img: module(img.to(self.device))
            self.backend = "eager"
            return
        path = Path(model)
        if not path.is_file():
            raise UserError(f"{path}: model file not found; export one with tools/export.py")
        self.meta = read_metadata(path)
        if path.suffix == ".onnx":
            self.device = torch.device("cpu")
            session = onnx_session(path)
            self._fn = lambda img: session.run(None, {"image": img.cpu().numpy()})
            self.backend = "onnxruntime"
        else:
            self.device = resolve_device(device, "device")
            with quiet_warnings():
                module = torch.jit.load(str(path), map_location=self.device)
            self._fn = lambda img: module(img.to(self.device))
            self.backend = "torchscript"

    @torch.no_grad()
    def __call__(self, image: torch.Tensor):
        with quiet_warnings():
            boxes, scores, ids = self._fn(image)
        return tuple(torch.as_tensor(v).cpu().numpy() for v in (boxes, scores, ids))


def read_metadata(model_path: str | os.PathLike) -> dict:
    path = Path(str(model_path) + ".json")
    if not path.is_file():
        raise UserError(f"{path}: metadata file missing; export writes it beside the model "
                        "(run tools/export.py again)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); export the model again") from None
