"""Benchmark section inference: images/s of a trained step as incdet's model, as torchvision's
(fused) and as every export format."""
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from incdet.base.config import with_defaults
from incdet.data import synthetic
from incdet.data.dataset import to_tensor
from incdet.deploy.export import export, onnx_session, quiet_warnings
from incdet.model.builder import build_model
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.model.torchvision import to_torchvision


def alternating_images_per_second(runners: dict, images: list, repeats: int = 3,
                                  warmup: int = 4) -> dict[str, float]:
    """Images/s of each ``runners[name](image)`` over ``images``, under ``no_grad``: a warm-up on
    the first ``warmup`` images, then ``repeats`` rounds alternating between the runners, the
    best round of each counting (machine noise hits them alike)."""
    best = {k: float("inf") for k in runners}
    with torch.no_grad():
        for fn in runners.values():
            for x in images[:warmup]:
                fn(x)
        for _ in range(repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                for x in images:
                    fn(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    return {k: len(images) / v for k, v in best.items()}


def inference_speed(ckpt_path: str | Path, num_images: int = 64, repeats: int = 3,
                    export_dir: str | Path | None = None) -> dict:
    """Images/s of a grown model at inference, one image per call, on validation-like images:
    the model as trained (one classifier conv per step), the same model fused into torchvision's
    head (what :func:`incdet.deploy.detector.load_detector` returns), and a plain torchvision
    RetinaNet with the same total number of classes and the same weights. With ``export_dir``,
    also the TorchScript and onnxruntime exports. Rounds alternate between the variants and the best
    round counts, so that machine noise hits them alike."""
    ckpt = load_checkpoint(ckpt_path)
    mcfg = with_defaults(ckpt["config"])["model"]
    grown = model_from_checkpoint(ckpt)
    fused = to_torchvision(grown)
    plain = to_torchvision(build_model(mcfg, [sum(ckpt["head_layout"])]))
    plain.load_state_dict(fused.state_dict())
    size = int(mcfg["max_size"])
    images = [to_tensor(np.array(synthetic.render_image(1, 9, i, size)[0]))
              for i in range(num_images)]
    runners = {"grown": lambda x: grown([x]), "grown_fused": lambda x: fused([x]),
               "plain_torchvision": lambda x: plain([x])}
    if export_dir is not None:
        export_dir = Path(export_dir)
        export(ckpt_path, "torchscript", export_dir / "model.pt", check_images=images[:2])
        with quiet_warnings():
            scripted = torch.jit.load(str(export_dir / "model.pt"))
        runners["torchscript"] = lambda x: scripted(x)

        if importlib.util.find_spec("onnxruntime") is not None:  # optional: the export extra
            export(ckpt_path, "onnx", export_dir / "model.onnx", check_images=images[:2])
            sess = onnx_session(export_dir / "model.onnx")
            runners["onnxruntime"] = lambda x: sess.run(None, {"image": x.numpy()})
    ips = alternating_images_per_second(runners, images, repeats)
    out = {"images": num_images, "image_size": size, "threads": torch.get_num_threads(),
           "images_per_second": ips,
           "grown_over_plain": ips["grown"] / ips["plain_torchvision"],
           "fused_over_plain": ips["grown_fused"] / ips["plain_torchvision"],
           "checkpoint": str(ckpt_path), "head_layout": list(ckpt["head_layout"])}
    if "onnxruntime" in ips:
        out["onnxruntime_over_eager"] = ips["onnxruntime"] / ips["grown_fused"]
    return out
