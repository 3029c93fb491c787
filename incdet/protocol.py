"""Runs every step of a split for several variants side by side, sharing identical work.

A variant is a name and config overrides (usually just ``incremental.method``); each lives in
``work_dir/<name>/step_<t>/``. Step 0 is the same training for every variant that shares the
model, data and training settings (the base classes, from scratch), so it is trained once, by
the first variant, and copied. Completed steps are skipped, so an interrupted protocol resumes
where it stopped.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from incdet.config import apply_override, parse_override
from incdet.step import load_experiment, run_step


def method_variants(methods: list[str]) -> dict[str, list[str]]:
    return {m: [f"incremental.method={m}"] for m in methods}


def run_protocol(cfg: dict, work_dir: str | Path, variants: dict[str, list[str]],
                 progress: bool = True, joint_last_only: bool = False) -> dict[str, list[dict]]:
    """Returns ``{variant: [metrics of step 0, 1, ...]}``.

    ``joint_last_only``: a ``joint`` variant trains only the last step (from scratch on every
    class; its earlier steps do not influence it), for benchmarks that compare final figures.
    """
    work_dir = Path(work_dir)
    _, _, classes = load_experiment(cfg, progress)
    results: dict[str, list[dict]] = {}
    first = None
    for name, overrides in variants.items():
        vcfg = copy.deepcopy(cfg)
        for item in overrides:
            apply_override(vcfg, *parse_override(item))
        vdir = work_dir / name
        if first is not None and (first / "step_0" / "metrics.json").is_file() and \
                not (vdir / "step_0" / "metrics.json").is_file():
            shutil.copytree(first / "step_0", vdir / "step_0", dirs_exist_ok=True)
        first = first or vdir
        steps = range(classes.num_steps)
        if joint_last_only and vcfg["incremental"]["method"] == "joint":
            steps = sorted({0, classes.num_steps - 1} if (vdir / "step_0").is_dir()
                           else {classes.num_steps - 1})
        results[name] = [run_step(vcfg, t, vdir, progress=progress) for t in steps]
    return results
