"""Detectors as files: a torchvision state dict, TorchScript and ONNX, and running them.

* The model exported is :func:`incdet.deploy.detector.load_detector`'s: a torchvision RetinaNet
  (:func:`incdet.model.torchvision.to_torchvision`) with the class metadata of its checkpoint.
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
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from incdet.base.config import with_defaults
from incdet.base.devices import resolve_device
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json
from incdet.data import synthetic
from incdet.data.dataset import to_tensor
from incdet.deploy.detector import load_detector
from incdet.model.torchvision import INCDET_ARCH, load_torchvision

# state_dict: the weights of the torchvision RetinaNet (torch.save(model.state_dict())), for a
# plain torchvision user or for tools/import_detector.py --arch incdet
FORMATS = ("torchscript", "onnx", "state_dict")


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
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_device = resolve_device(device, "device") if fmt == "torchscript" else \
        torch.device("cpu")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_detector(ckpt_path, "cpu")
    model_cfg = with_defaults(model.incdet_config)["model"]
    meta = dict(model.incdet_meta, format=fmt, file=out.name,
                source_checkpoint=str(ckpt_path))
    module = ExportModule(model, meta["category_ids"]).eval()
    images = list(check_images) if check_images is not None else sample_images()
    tmp = out.with_name(out.name + ".tmp")
    try:
        if fmt == "state_dict":
            got = _save_state_dict(model, model_cfg, tmp, images)
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
    if fmt == "state_dict":
        # what `import_detector --arch incdet` needs in the config's model section to rebuild it
        meta["model"] = {k: v for k, v in model_cfg.items() if k != "weights"}
    atomic_write_json(out.with_name(out.name + ".json"), meta)
    return meta


def _save_state_dict(model: RetinaNet, model_cfg: dict, path: Path,
                     images: Sequence[torch.Tensor]) -> list:
    """Save ``model``'s state dict and rebuild it as a user would: the torchvision RetinaNet
    that the checkpoint's model settings describe (``import_detector --arch incdet``), the file
    loaded data-only. Returns that model's outputs on ``images``, to check against the eager
    model (a detector whose post-processing is not torchvision's, per-step caps or ``branch``
    towers, does not fit and is refused)."""
    torch.save(model.state_dict(), path)
    try:
        rebuilt = load_torchvision(path, INCDET_ARCH, str(path), dict(model_cfg))
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
        import onnxruntime as ort  # optional: the export extra
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
