"""Generate the built-in shapes dataset (COCO format) at a folder, or a COCO-size annotation file.

    python tools/make_dataset.py --out-dir data/shapes [--train 2000 --val 300 --size 128]
    python tools/make_dataset.py --out-dir data/coco_like --coco-like [--train 118287 --seed 0]
    python tools/make_dataset.py --out-dir tutorial/data --user-data 5 [--train 400 --val 100]

``--user-data N`` writes the images as a user's data looks when new classes arrive
(docs/tutorial.md): the classes after the first N in ``new_train.json`` / ``new_val.json``,
numbered from 1, and the first N in ``old_val.json``
(:func:`incdet.data.synthetic.write_user_data`).
``--coco-like`` writes only ``OUT_DIR/annotations/instances_train2017.json`` (no images): COCO's
size, category ids and box statistics, for measuring bookkeeping (``incdet.data.coco_like``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from incdet.data import coco_like, synthetic
from incdet.tools.cli import add_renamed, main_guard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_renamed(parser, "--out-dir", "--out", required=True, metavar="DIR",
                help="the dataset's folder (images/ and annotations/ are written into it)")
    parser.add_argument("--train", type=int, default=None,
                        help="training images (default 2000; --coco-like: 118287)")
    parser.add_argument("--val", type=int, default=300, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    parser.add_argument("--coco-like", action="store_true",
                        help="write a COCO-size annotation file without images instead")
    parser.add_argument("--user-data", type=int, metavar="N",
                        help="write the data of docs/tutorial.md instead: new_train.json and "
                             "new_val.json (the classes after the first N, numbered from 1) and "
                             "old_val.json (the first N classes); the folder must be new or empty")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.user_data is not None:
        if not 1 <= args.user_data < len(synthetic.CATEGORIES):
            parser.error(f"--user-data {args.user_data}: expected 1 to "
                         f"{len(synthetic.CATEGORIES) - 1} old classes")
        files = synthetic.write_user_data(
            args.out_dir, args.user_data, 400 if args.train is None else args.train, args.val,
            args.size, args.seed, progress=not args.no_progress)
        print(f"wrote the images and {', '.join(str(p) for p in files.values())}")
        return 0

    if args.coco_like:
        num = coco_like.COCO_TRAIN_IMAGES if args.train is None else args.train
        path = coco_like.write_coco_like(
            Path(args.out_dir) / "annotations" / "instances_train2017.json", num_images=num,
            seed=args.seed)
        print(f"wrote a COCO-like annotation file of {num} images to {path}")
        return 0
    num = 2000 if args.train is None else args.train
    root = synthetic.generate(args.out_dir, num, args.val, args.size, args.seed,
                              progress=not args.no_progress)
    print(f"wrote {num} + {args.val} images to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
