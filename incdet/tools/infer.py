"""Run a detector on images: COCO-results JSON and PNG copies with the detections drawn.

    python tools/infer.py --checkpoint runs/exp/step_1/checkpoint.pt --images photos/ --out-dir out/
    python tools/infer.py --model det.onnx --images a.png b.png --out-dir out/

--checkpoint runs the eager torchvision model; --model runs an exported file (TorchScript .pt
or ONNX .onnx, with its .json metadata beside it). Writes OUT_DIR/detections.json (a list of
{"image_id", "file_name", "category_id", "category_name", "bbox" [x, y, w, h], "score"}; image ids
number the inputs from 1 in the order processed) and OUT_DIR/<image name>.png with boxes and class
names drawn.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from incdet.base.devices import resolve_device
from incdet.base.io import IMAGE_SUFFIXES, atomic_write_json, image_files
from incdet.data.dataset import read_image, to_tensor
from incdet.deploy.export import Runner
from incdet.tools.cli import add_device, add_renamed, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an incdet step checkpoint (eager PyTorch)")
    source.add_argument("--model", help="an exported model file (.pt TorchScript or .onnx)")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files, or folders of images (" + ", ".join(IMAGE_SUFFIXES)
                        + ")")
    add_renamed(parser, "--out-dir", "--out", required=True, metavar="DIR",
                help="output folder (detections.json and the drawings)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="keep detections at or above this score (default: the model's)")
    parser.add_argument("--no-draw", action="store_true", help="write the JSON only")
    add_device(parser, "where a checkpoint or TorchScript model runs (ONNX: on CPU)",
               default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    files = image_files(args.images)
    device = resolve_device(args.device, "--device")
    runner = Runner(checkpoint=args.checkpoint, model=args.model, device=device)
    meta = runner.meta
    thresh = meta["score_thresh"] if args.score_thresh is None else args.score_thresh
    names = dict(zip(meta["category_ids"], meta["names"]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, path in enumerate(tqdm(files, desc=f"detecting ({runner.backend})",
                                      disable=args.no_progress), start=1):
        array = read_image(path)
        image = to_tensor(array)
        boxes, scores, ids = runner(image)
        keep = scores >= thresh
        boxes, scores, ids = boxes[keep], scores[keep], ids[keep]
        for b, s, c in zip(boxes.tolist(), scores.tolist(), ids.tolist()):
            results.append({"image_id": index, "file_name": str(path), "category_id": int(c),
                            "category_name": names.get(int(c), str(c)),
                            "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2),
                                     round(b[3] - b[1], 2)], "score": round(float(s), 5)})
        if not args.no_draw:
            canvas = torch.from_numpy(array).permute(2, 0, 1).contiguous()
            if len(boxes):
                labels = [f"{names.get(int(c), c)} {s:.2f}" for c, s in zip(ids, scores)]
                canvas = draw_bounding_boxes(canvas, torch.as_tensor(boxes), labels=labels,
                                             colors="red", width=1)
            Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(out / f"{path.stem}.png")
    atomic_write_json(out / "detections.json", results)
    print(f"{len(results)} detections in {len(files)} images -> {out / 'detections.json'}"
          + ("" if args.no_draw else f", drawings in {out}/"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
