"""Where the time of a training iteration goes: model forward/backward vs the host side.

    python tools/hostcost.py [--config configs/shapes_2step.yaml] [--iters 5] [--threads 1]

Runs the training loop on CPU (what it measures is the host side of an iteration: no --device)
on one fixed batch of an ``incdet`` step 1 (student and teacher) and prints the median seconds
per iteration of each part as JSON (:mod:`incdet.bench.hostcost`).
"""
from __future__ import annotations

import argparse
import json

from incdet.base.config import load_config
from incdet.bench.hostcost import host_cost
from incdet.tools.cli import main_guard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_2step.yaml",
                        help="YAML config file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.amp=bf16")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: unchanged)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    result = host_cost(cfg, iters=args.iters, batch_size=args.batch_size,
                       threads=args.threads or None)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v
                      for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
