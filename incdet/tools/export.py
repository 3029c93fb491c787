"""Export a step's detector to TorchScript, ONNX or a torchvision state dict, with a metadata JSON.

    python tools/export.py --checkpoint runs/exp/step_1/checkpoint.pt --format onnx --out det.onnx

Writes OUT and OUT.json (class names and dataset category ids in output order, the step
history, the input convention, the score threshold). The exported model takes one RGB float
image in [0, 1] of shape (3, H, W) and returns boxes (xyxy, input pixels), scores and category
ids. ``--format state_dict`` saves the weights of the torchvision RetinaNet instead
(``torch.save(model.state_dict())``; the detector ``tools/import_detector.py --arch incdet``
rebuilds from the config's model settings, with OUT.json as its ``--classes``). The export is
verified by running the written file on sample images of several sizes
against the eager model; a mismatch fails with the numbers and writes nothing.
"""
from __future__ import annotations

import argparse

from incdet.base.devices import resolve_device
from incdet.base.errors import UserError
from incdet.deploy.export import FORMATS, export
from incdet.tools.cli import add_device, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step_<t>/checkpoint.pt")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="torchscript (.pt), onnx (.onnx) or state_dict (a torchvision "
                             "RetinaNet's weights, .pt)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="output file (.pt / .onnx); OUT.json is written beside it")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    add_device(parser, "where a TorchScript export is checked against the eager model (the "
               "file holds CPU weights either way; ONNX is checked on CPU)", default="auto")
    args = parser.parse_args(argv)
    setup_logging()

    if args.opset < 17:
        raise UserError(f"--opset {args.opset}: use 17 or later")
    device = resolve_device(args.device, "--device")
    meta = export(args.checkpoint, args.format, args.out, opset=args.opset, device=device)
    print(f"wrote {args.out} and {args.out}.json: {len(meta['category_ids'])} classes "
          f"(step {meta['step']}), verified on images of sizes {meta['checked_images']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
