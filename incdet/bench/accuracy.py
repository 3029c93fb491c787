"""Benchmark sections 2step, 4step, 6step: the methods' accuracy side by side on one protocol, its
ratio to the equal-compute ``joint``, old-class retention, and figures over seeds."""
from __future__ import annotations

import json
from pathlib import Path

from incdet.base.config import differing_keys, load_config
from incdet.base.errors import UserError
from incdet.experiment.protocol import run_protocol


def accuracy(cfg: dict, work_dir: Path, variants: dict[str, list[str]], progress: bool) -> dict:
    """Final AP per variant, its ratio to ``joint``, and old-class retention."""
    res = run_protocol(cfg, work_dir, variants, progress, joint_last_only=True)
    out = {"steps": {m: [{"step": s["step"], "map": {g: s["map"][g]["AP"] for g in s["map"]},
                          "new_classes": len(s["classes"]["new"]),
                          "forgetting": s["forgetting"], "seconds": s["train"]["seconds"]}
                         for s in steps] for m, steps in res.items()}}
    final = {m: steps[-1]["map"]["all"]["AP"] for m, steps in res.items()}
    out["final_ap"] = final
    if "joint" in final and final["joint"]:
        out["ratio_to_joint"] = {m: v / final["joint"] for m, v in final.items()}
    base = {m: steps[0]["map"]["new"]["AP"] for m, steps in res.items()}
    # retention of the step-0 classes: their AP at the last step over their AP at step 0
    out["step0_retention"] = {m: (steps[-1]["groups"]["step_0"]["AP"] / base[m]
                                  if base[m] and steps[0]["step"] == 0 else None)
                              for m, steps in res.items()}
    out["old_ap_retention"] = {
        m: (steps[-1]["map"]["old"]["AP"] / _old_ap_when_learned(steps)
            if _old_ap_when_learned(steps) else None) for m, steps in res.items()}
    out["last_step_seconds"] = {m: steps[-1]["train"]["seconds"] for m, steps in res.items()}
    if "joint" in res and res["joint"][-1].get("curve"):  # how converged the reference is
        out["joint_curve"] = res["joint"][-1]["curve"]
    return out


def read_joint_reference(metrics_path: str | Path, cfg: dict, all_classes: list[int],
                         iterations: int | None = None) -> float:
    """``joint``'s final AP from an existing step-0 run on every class (for example
    ``configs/shapes_joint.yaml``), instead of training it again. The run must have used the same
    data (its folder aside: the evaluation subset and the generator's settings count), model,
    augmentation, loss and training settings and all classes, and have trained ``iterations``
    iterations (the equal-compute budget: the incremental run's steps together; None: the
    same ``train.max_iters``); anything else is a :class:`UserError` naming the differences.
    Check it before training the other methods, so that a wrong reference fails at once."""
    metrics_path = Path(metrics_path)
    cfg_path = metrics_path.parent / "config.yaml"
    if not metrics_path.is_file() or not cfg_path.is_file():
        raise UserError(f"--joint-reference: {metrics_path} (and config.yaml beside it) must be "
                        "the metrics.json of a finished step-0 run on all classes")
    with open(metrics_path) as f:
        metrics = json.load(f)
    ref_cfg = load_config(cfg_path)
    # the same data may live elsewhere; how often a run saves or logs, and on how many threads
    # it computes, does not change it
    budget = {("data", "root"), ("train", "checkpoint_every"), ("train", "log_every"),
              ("train", "threads")}
    if iterations is not None:  # the budget is checked by the iterations trained instead
        budget |= {("train", "max_iters"), ("train", "epochs"), ("train", "iters_per_class")}
    diffs = [f"{section}.{k}" for section in ("data", "model", "augment", "loss", "train")
             for k in differing_keys(cfg[section], ref_cfg[section]) if (section, k) not in budget]
    trained = metrics.get("train", {}).get("iterations")
    if iterations is not None and trained != iterations:
        diffs.append(f"{trained} iterations (the equal-compute joint needs {iterations}: the "
                     "incremental run's steps together)")
    seen = sorted(metrics["classes"]["old"] + metrics["classes"]["new"])
    if seen != sorted(all_classes):
        diffs.append(f"classes ({len(seen)} of {len(all_classes)})")
    if diffs:
        raise UserError(f"--joint-reference: {metrics_path} was trained differently from this "
                        f"benchmark: {', '.join(diffs)}")
    return float(metrics["map"]["all"]["AP"])


def with_joint_reference(result: dict, joint_ap: float, source: str | Path) -> dict:
    """``result`` of :func:`accuracy` with ``joint``'s AP taken from a reference run (and its
    AP curve, when the run recorded one)."""
    out = dict(result)
    metrics_path = Path(source)
    if metrics_path.is_file():
        with open(metrics_path) as f:
            curve = json.load(f).get("curve")
        if curve:
            out["joint_curve"] = curve
    out["final_ap"] = dict(result["final_ap"], joint=joint_ap)
    out["joint_reference"] = str(source)
    out["ratio_to_joint"] = {m: v / joint_ap for m, v in out["final_ap"].items()}
    return out


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Results of :func:`accuracy` for several seeds -> the same keys, each figure replaced by
    ``{"mean", "min", "max", "n"}`` over the seeds that have it; the per-seed results stay
    under ``"seeds"``."""
    out: dict = {"seeds": {str(k): v for k, v in per_seed.items()}}
    for key in ("final_ap", "ratio_to_joint", "step0_retention", "old_ap_retention",
                "last_step_seconds"):
        names: list[str] = []  # in the order the variants ran
        for r in per_seed.values():
            names += [m for m in r.get(key, {}) if m not in names]
        if not names:
            continue
        out[key] = {}
        for m in names:
            vals = [r[key][m] for r in per_seed.values() if r.get(key, {}).get(m) is not None]
            out[key][m] = ({"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                            "n": len(vals)} if vals else None)
    curves = {str(k): r["joint_curve"] for k, r in per_seed.items() if r.get("joint_curve")}
    if curves:
        out["joint_curve"] = curves
    return out


# before the benchmark named its variants as run_protocol does (experiment.protocol.VARIANTS),
# its incdet ran without the exemplar memory and incdet_memory with it
FORMER_NAMES = {"incdet": "incdet_no_memory", "incdet_memory": "incdet"}
# the figures of a protocol section (and of each seed's result) that are keyed by variant
PER_VARIANT = ("final_ap", "ratio_to_joint", "step0_retention", "old_ap_retention",
               "last_step_seconds", "steps")


def in_current_names(result: dict) -> dict:
    """A protocol section's result with its variants named as today: one written before the
    section recorded its ``variants`` used :data:`FORMER_NAMES` (``NAME@overrides`` too)."""
    if "variants" in result:
        return result

    def name(key: str) -> str:
        base, *extra = key.split("@")
        return "@".join([FORMER_NAMES.get(base, base), *extra])

    out = {k: ({name(m): v for m, v in result[k].items()} if k in PER_VARIANT else v)
           for k, v in result.items()}
    if "seeds" in result:
        out["seeds"] = {seed: in_current_names(r) for seed, r in result["seeds"].items()}
    return out


def spread_text(v: dict | None, spec: str = ".3f") -> str:
    """``0.512 (0.509–0.515, 2 seeds)``, or the value alone for one seed."""
    if v is None:
        return "–"
    if v["n"] == 1:
        return f"{format(v['mean'], spec)} (1 seed)"
    return (f"{format(v['mean'], spec)} ({format(v['min'], spec)}–{format(v['max'], spec)}, "
            f"{v['n']} seeds)")


def _old_ap_when_learned(steps: list[dict]) -> float | None:
    """Mean over earlier groups of their AP at the step they were learned."""
    vals = [s["groups"][f"step_{s['step']}"]["AP"] for s in steps[:-1]]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None
