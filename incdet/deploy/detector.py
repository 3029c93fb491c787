"""A detector for applications: load a trained step as a torchvision RetinaNet
(:func:`load_detector`) and run it on images (:class:`Detector`). Both run on the device they
are given (default ``auto``: CUDA when available, else CPU), never on the ``train.device`` saved
in the checkpoint.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models.detection import RetinaNet

from incdet.base.devices import resolve_device
from incdet.base.errors import UserError
from incdet.data.dataset import read_image, to_tensor
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.model.torchvision import to_torchvision

INPUT = {"layout": "CHW", "channels": "RGB", "dtype": "float32", "range": [0.0, 1.0],
         "batch": "one image per call"}


OUTPUTS = ["boxes (R, 4) xyxy in input pixels", "scores (R,)", "category_ids (R,) int64"]


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
