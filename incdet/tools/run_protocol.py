"""Run every step of a class-incremental protocol for several methods and write a report.

    python tools/run_protocol.py --config configs/shapes_2step.yaml --work-dir runs/exp \\
        --methods incdet,finetune,joint

Each method lives in WORK/<method>/step_<t>/. Methods that train step 0 identically share it
(trained once). Completed steps are skipped and an interrupted one resumes, so the same command
continues a stopped run. At the end WORK/summary.json, WORK/report.md and the plots
WORK/ap_over_steps.png, WORK/per_class_ap.png and WORK/detections.png (each method's detections
on the same validation images after the last step) are written and the table is printed.
"""
from __future__ import annotations

import argparse

from incdet.base.config import load_config
from incdet.experiment.loaders import load_experiment
from incdet.experiment.protocol import VARIANTS, method_variants, run_protocol, with_step0
from incdet.experiment.report import table, write_report
from incdet.tools.cli import add_device, device_overrides, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--work-dir", required=True, help="experiment folder")
    parser.add_argument("--methods", default="incdet,finetune,joint",
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " (incdet with "
                             "the config's exemplar memory; incdet_no_memory without it; "
                             "incdet_pseudo without it, with the teacher's pseudo-labels; "
                             "default: %(default)s)")
    parser.add_argument("--step0", metavar="DIR",
                        help="a finished step_0 folder every method starts from (e.g. one "
                             "written by tools/import_detector.py) instead of training step 0; "
                             "its model settings and classes are used")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value for every method")
    parser.add_argument("--pictures", type=int, default=3, metavar="N",
                        help="validation images in detections.png (0: none)")
    parser.add_argument("--force", action="store_true",
                        help="train every step again, also those already complete (without it, "
                             "a completed step of another config is an error)")
    add_device(parser, "where to train; sets train.device of every method")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()

    variants = method_variants([m.strip() for m in args.methods.split(",") if m.strip()])
    cfg = load_config(args.config, args.overrides + device_overrides(args.device))
    progress = not args.no_progress
    results = run_protocol(cfg, args.work_dir, variants, progress=progress, step0=args.step0,
                           force=args.force)
    if args.step0:
        cfg = with_step0(cfg, args.step0)
    _, val_set, classes = load_experiment(cfg, progress=False)
    summary = write_report(results, args.work_dir, classes.to_dict()["names"],
                           config=str(args.config), split=cfg["split"],
                           val_records=val_set.records[:args.pictures])
    print(table(summary))
    files = summary["files"]
    print(f"\nreport: {files['report']}\nplots:  {files['ap_over_steps']}, "
          f"{files['per_class_ap']}\nsummary: {files['summary']}")
    if "detections" in files:
        print(f"detections: {files['detections']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
