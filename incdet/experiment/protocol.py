"""Runs every step of a split for several variants side by side, sharing identical work.

A variant is a name and config overrides (usually just ``incremental.method``; :data:`VARIANTS`
names those the tools compare); each lives in ``work_dir/<name>/step_<t>/``. Step 0 trains the
base classes from scratch in the same way for every method, so variants whose configs differ
only in ``incremental`` and ``memory`` settings train it once (the first of them) and copy the
finished folder; a variant that needs an exemplar memory the copy lacks selects it from the
copied model. Completed steps are skipped and an interrupted one resumes from its ``last.pt``,
so running the same protocol again continues where it stopped.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from incdet.base.config import apply_overrides, load_config
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json
from incdet.experiment.exemplars import write_memory
from incdet.experiment.loaders import load_experiment
from incdet.experiment.methods import METHODS, memory_enabled
from incdet.experiment.step import run_step
from incdet.experiment.step_folder import config_digest

# Settings that do not change how step 0 is trained (only later steps, or what is saved after).
_STEP0_NEUTRAL = ("incremental", "memory")


# The variants tools/run_protocol.py and tools/benchmark.py compare, by name: every method with
# the config's settings (``incdet`` with the config's exemplar memory), and incdet without it.
VARIANTS = {**{m: [f"incremental.method={m}"] for m in METHODS},
            "incdet_no_memory": ["incremental.method=incdet", "memory.budget=0"],
            # with the teacher's old-class detections as extra targets
            "incdet_pseudo": ["incremental.method=incdet", "memory.budget=0",
                              "incremental.pseudo_labels=true"]}


def method_variants(methods: list[str]) -> dict[str, list[str]]:
    """The config overrides of each variant named in ``methods`` (:data:`VARIANTS`); an unknown
    name, or none, is a :class:`UserError` listing the names."""
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        raise UserError(f"--methods: {','.join(unknown) or '(empty)'} not among "
                        f"{', '.join(VARIANTS)}")
    return {m: list(VARIANTS[m]) for m in methods}


def variant_configs(cfg: dict, variants: dict[str, list[str]]) -> dict[str, dict]:
    out = {}
    for name, overrides in variants.items():
        vcfg = copy.deepcopy(cfg)
        apply_overrides(vcfg, overrides)
        out[name] = vcfg
    return out


def _step0_key(cfg: dict) -> str:
    return repr({k: v for k, v in sorted(cfg.items()) if k not in _STEP0_NEUTRAL})


def with_step0(cfg: dict, step0: str | Path) -> dict:
    """``cfg`` with the ``model`` settings and ``categories`` of a finished step-0 folder (an
    imported detector's, for example), which later steps must match."""
    step0 = Path(step0)
    if not (step0 / "metrics.json").is_file() or step0.name != "step_0":
        raise UserError(f"--step0 {step0}: not a finished step_0 folder (it needs "
                        "metrics.json); import or train step 0 first")
    own = load_config(step0 / "config.yaml")
    return dict(cfg, model=own["model"], categories=own.get("categories"))


def run_protocol(cfg: dict, work_dir: str | Path, variants: dict[str, list[str]],
                 progress: bool = True, joint_last_only: bool = False,
                 step0: str | Path | None = None, force: bool = False) -> dict[str, list[dict]]:
    """Returns ``{variant: [metrics of step 0, 1, ...]}``.

    ``joint_last_only``: a ``joint`` variant trains only the last step (from scratch on every
    class; its earlier steps do not influence it), for benchmarks that compare final figures.
    ``step0``: a finished step-0 folder (for example an imported detector's
    ``W/step_0``) that every variant starts from instead of training its own; its config's
    ``model`` settings and ``categories`` replace ``cfg``'s (they must fit its weights).
    ``force``: every variant's steps are trained again (their completed results and interrupted
    states are removed first); without it a completed step of another config is an error.
    """
    work_dir = Path(work_dir)
    if force:
        for name in variants:
            for path in [*(work_dir / name).glob("step_*/metrics.json"),
                         *(work_dir / name).glob("step_*/last.pt")]:
                path.unlink()
    if step0 is not None:
        step0 = Path(step0)
        cfg = with_step0(cfg, step0)
    _, _, classes = load_experiment(cfg, progress)
    configs = variant_configs(cfg, variants)
    if step0 is not None:
        for name, vcfg in configs.items():
            share_step0(step0.parent, work_dir / name, vcfg, progress)
    last = classes.num_steps - 1
    skip_early = {name for name, vcfg in configs.items()
                  if joint_last_only and vcfg["incremental"]["method"] == "joint"}
    total = sum(2 if name in skip_early and last > 0 else last + 1 for name in configs)
    results: dict[str, list[dict]] = {}
    shared: dict[str, Path] = {}  # step-0 key -> the variant folder that trained it
    with tqdm(total=total, desc="protocol steps", disable=not progress, unit="step") as bar:
        for name, vcfg in configs.items():
            vdir = work_dir / name
            key = _step0_key(vcfg)
            results[name] = []
            for t in range(classes.num_steps):
                if name in skip_early and 0 < t < last:
                    continue
                bar.set_postfix_str(f"{name} step {t}")
                if t == 0 and key in shared:
                    share_step0(shared[key], vdir, vcfg, progress)
                elif t == 0 and name in skip_early and last > 0 and \
                        not (vdir / "step_0" / "metrics.json").is_file():
                    bar.update(1)  # joint's own step 0 would not influence its last step
                    continue
                results[name].append(run_step(vcfg, t, vdir, resume=True, progress=progress))
                if t == 0:
                    shared.setdefault(key, vdir)
                bar.update(1)
    return results


def share_step0(source: Path, vdir: Path, cfg: dict, progress: bool) -> None:
    """Copy the finished ``source/step_0`` to ``vdir/step_0`` (metrics.json last), selecting the
    exemplar memory from the copied model when ``cfg`` needs one the copy lacks; a no-op when
    ``vdir`` has its step 0 or ``source`` has none."""
    src, dst = source / "step_0", vdir / "step_0"
    if (dst / "metrics.json").is_file() or not (src / "metrics.json").is_file():
        return
    dst.mkdir(parents=True, exist_ok=True)
    uses_memory = memory_enabled(cfg) and cfg["incremental"]["method"] == "incdet"
    for item in src.iterdir():
        if item.name == "memory.json" and not uses_memory:
            continue
        if item.is_file() and item.name != "metrics.json":
            shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
    if uses_memory and not (dst / "memory.json").is_file():
        write_memory(cfg, 0, vdir, progress)
    # last: the folder is complete. The protocol shares this step 0 with the variant (their
    # step-0 settings agree, or it starts from --step0): it is complete for the variant's config
    metrics = json.loads((src / "metrics.json").read_text())
    metrics["config_digest"] = config_digest(cfg)
    metrics["shared_from"] = str(src)
    atomic_write_json(dst / "metrics.json", metrics)
