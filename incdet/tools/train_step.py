"""Train and evaluate one step of a class-incremental experiment.

    python tools/train_step.py --config configs/shapes_2step.yaml --step 0 --work-dir runs/demo
"""
from __future__ import annotations

import argparse

from incdet.base.config import load_config
from incdet.experiment.step import run_step
from incdet.tools.cli import add_device, device_overrides, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--step", type=int, required=True, help="step index (0 = base classes)")
    parser.add_argument("--work-dir", required=True, help="experiment folder (step_<t>/ inside)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.max_iters=5")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted step")
    parser.add_argument("--force", action="store_true", help="retrain a completed step")
    add_device(parser, "where to train; sets train.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    cfg = load_config(args.config, args.overrides + device_overrides(args.device))
    run_step(cfg, args.step, args.work_dir, resume=args.resume, force=args.force,
             progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
