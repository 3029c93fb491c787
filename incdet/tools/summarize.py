"""Print the per-step results of a work directory (old / new / all AP, forgetting, time).

    python tools/summarize.py --work-dir runs/demo/incdet
"""
from __future__ import annotations

import argparse

from incdet.base.errors import UserError
from incdet.experiment.summary import read_steps, steps_table
from incdet.tools.cli import deprecated, main_guard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="experiment folder (its step_<t>/ folders are read)")
    parser.add_argument("folder", nargs="?", metavar="WORK_DIR",
                        help="the same folder as a positional argument (the former spelling, "
                             "deprecated)")
    args = parser.parse_args(argv)
    if args.folder is not None:
        if args.work_dir is not None:
            parser.error("give the folder once, with --work-dir")
        deprecated("the positional WORK_DIR", "--work-dir WORK_DIR")
        args.work_dir = args.folder
    if args.work_dir is None:
        parser.error("the following arguments are required: --work-dir")

    steps = read_steps(args.work_dir)
    if not steps:
        raise UserError(f"{args.work_dir}: no completed step (step_<t>/metrics.json) found")
    print(steps_table(steps))
    print(f"\nper-step files: {args.work_dir}/step_<t>/ (metrics.json, checkpoint.pt, TensorBoard)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
