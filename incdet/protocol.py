"""Runs every step of a split for several methods side by side, sharing identical work.

Each method lives in ``work_dir/<method>/step_<t>/``. Step 0 is the same training for every
method (the base classes, from scratch), so it is trained once and copied. Steps already
complete are skipped, so an interrupted protocol resumes where it stopped.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from incdet.step import load_experiment, run_step


def run_protocol(cfg: dict, work_dir: str | Path, methods: list[str],
                 progress: bool = True) -> dict[str, list[dict]]:
    """Returns ``{method: [metrics of step 0, 1, ...]}``."""
    work_dir = Path(work_dir)
    _, _, classes = load_experiment(cfg, progress)
    results: dict[str, list[dict]] = {}
    for i, method in enumerate(methods):
        mcfg = copy.deepcopy(cfg)
        mcfg["incremental"]["method"] = method
        mdir = work_dir / method
        first = work_dir / methods[0] / "step_0"
        if i > 0 and (first / "metrics.json").is_file() and \
                not (mdir / "step_0" / "metrics.json").is_file():
            shutil.copytree(first, mdir / "step_0", dirs_exist_ok=True)
        results[method] = [run_step(mcfg, t, mdir, progress=progress)
                           for t in range(classes.num_steps)]
    return results

