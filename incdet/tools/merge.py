"""Merge detectors into one (or compress one into a smaller one) by distillation.

    python tools/merge.py --teacher runs/a/step_0 --teacher runs/b/step_0 --work-dir runs/merged
    python tools/merge.py --teacher runs/exp/branch/step_1 --config configs/shapes_2step.yaml \\
        --set merge.transfer_step=1 --work-dir runs/consolidated

The teachers are step folders or checkpoints (any method, imported detectors included). The
transfer set is ``--images`` (a folder, no labels needed) or the config's training data (its
boxes train too, where it has them; ``--no-labels`` drops them). The student's layout, training
settings and validation data come from ``--config`` (default: the first teacher's config). The
result is ``WORK_DIR/step_<t>/``, an ordinary step folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from incdet.base.config import load_config
from incdet.base.io import IMAGE_SUFFIXES
from incdet.experiment.merge import OVERLAP_RULES, merge
from incdet.tools.cli import add_device, device_overrides, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", required=True, metavar="PATH",
                        help="a step folder or checkpoint.pt (repeat for several teachers)")
    parser.add_argument("--work-dir", required=True, help="output folder (step_<t>/ inside)")
    parser.add_argument("--config", default=None,
                        help="the student's config: layout, training settings, data and the "
                             "merge section (default: the first teacher's config.yaml)")
    parser.add_argument("--images", default=None, metavar="FOLDER",
                        help="transfer set: a folder of images, no labels needed ("
                             + ", ".join(IMAGE_SUFFIXES) + "; default: the config's training "
                             "data)")
    parser.add_argument("--overlap", choices=OVERLAP_RULES, default=None,
                        help="a class several teachers know: error (default), first or mean")
    parser.add_argument("--no-labels", action="store_true",
                        help="ignore the transfer set's boxes (pure distillation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. merge.iters=500")
    parser.add_argument("--no-eval", action="store_true", help="do not evaluate the result")
    parser.add_argument("--force", action="store_true", help="overwrite an existing result")
    add_device(parser, "where to train and evaluate the student; sets train.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    config = args.config or _teacher_config(args.teacher[0])
    overrides = list(args.overrides) + device_overrides(args.device)
    if args.overlap:
        overrides.append(f"merge.overlap={args.overlap}")
    if args.no_labels:
        overrides.append("merge.labels=false")
    cfg = load_config(config, overrides)
    metrics = merge(args.teacher, args.work_dir, cfg, images=args.images, force=args.force,
                    progress=not args.no_progress, evaluate=not args.no_eval)
    print(f"merged step {metrics['step']} written to {args.work_dir}/step_{metrics['step']}")
    return 0


def _teacher_config(teacher: str) -> str:
    path = Path(teacher)
    folder = path if path.is_dir() else path.parent
    return str(folder / "config.yaml")


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
