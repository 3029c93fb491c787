"""Generate the built-in shapes dataset (COCO format) at a folder.

    python tools/make_dataset.py --out data/shapes [--train 2000 --val 300 --size 128 --seed 0]
"""
from __future__ import annotations

import argparse

from incdet.data import synthetic
from incdet.tools.cli import main_guard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=300, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    root = synthetic.generate(args.out, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} images to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
