"""Evaluate a step checkpoint on the validation set and print the COCO table by class group.

    python tools/evaluate.py --checkpoint runs/demo/incdet/step_0/checkpoint.pt [--config C]
        [--device cpu] [--out evaluation.json]
"""
from __future__ import annotations

import argparse

from incdet.base.config import load_config
from incdet.base.devices import resolve_device
from incdet.base.io import atomic_write_json
from incdet.evaluation.coco_eval import format_table
from incdet.experiment.evaluate import evaluate_checkpoint
from incdet.tools.cli import add_device, add_renamed, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the step's checkpoint.pt (step_<t>/checkpoint.pt)")
    parser.add_argument("--config", help="YAML config (default: the one saved in the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="config override (of --config, else of the checkpoint's saved "
                             "config), e.g. model.score_thresh=0.3")
    add_renamed(parser, "--out", "--json", metavar="FILE",
                help="also write the evaluation to this JSON file")
    add_device(parser, "where to evaluate, never the train.device saved in the checkpoint",
               default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    device = resolve_device(args.device, "--device")
    # --set changes --config, or else the config saved in the checkpoint
    cfg = load_config(args.config, args.overrides) if args.config else None
    evaluation, classes = evaluate_checkpoint(args.checkpoint, cfg, not args.no_progress,
                                              None if args.config else args.overrides, device)
    print(format_table(evaluation, classes.names))
    if args.out:
        atomic_write_json(args.out, evaluation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
