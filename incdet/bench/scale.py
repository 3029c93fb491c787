"""Benchmark section scale: COCO-size bookkeeping, timed with peak memory, on a COCO-like file.

:func:`bookkeeping` and :func:`pycocotools_load` each run in a fresh process (their peak resident
memory is that process's own, imports included): loading the annotation file, the class spaces
and the step training sets of the 40+40 and 40+10x4 splits, the training loader's set-up (the
mixed batch sampler) with a 2,000-image memory, writing and reading that memory, and the images
the memory pass computes features for with and without ``memory.candidates_per_class``.
:func:`ranking_time` times herding over growing candidate counts; :func:`candidates_quality`
measures what the candidate bound does to the memory on the built-in data.
"""
from __future__ import annotations

import contextlib
import copy
import io
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from incdet.base.config import DEFAULTS
from incdet.base.devices import resolve_device
from incdet.base.io import atomic_write_json
from incdet.data.classes import ClassSpace
from incdet.data.coco import load_coco
from incdet.data.coco_like import write_coco_like
from incdet.data.records import filter_for_classes
from incdet.experiment.exemplars import candidate_ids
from incdet.experiment.loaders import load_experiment, train_loader
from incdet.experiment.step import run_step
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.train.memory import Memory, build_memory, quotas, rank_classes, roi_features

SPLITS = ("40+40", "40+10x4")
MEMORY_BUDGET = 2000  # configs/_coco_base.yaml


def peak_gib() -> float:
    """This process's peak resident memory so far, GiB. On Linux from ``VmHWM``: ``ru_maxrss``
    survives ``exec``, so a spawned process would report its parent's peak when larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def ensure_file(path: str | Path, seed: int = 0) -> tuple[Path, float | None]:
    """The COCO-like annotation file at ``path``, written if missing; seconds it took (or None)."""
    path = Path(path)
    if path.is_file():
        return path, None
    t0 = time.perf_counter()
    write_coco_like(path, seed=seed)
    return path, time.perf_counter() - t0


def pycocotools_load(path: str) -> dict:
    """pycocotools' own ``COCO(path)``: seconds and peak memory (run it in a fresh process)."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(path)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": len(coco.imgs), "boxes": len(coco.anns),
            "peak_gib": peak_gib()}


def _toy_memory(records_by_class: dict[int, list], seen, budget: int) -> tuple[Memory, dict]:
    """A memory of the bookkeeping's size: each class's first images (ranked in file order)."""
    quota = quotas(list(seen), budget)
    rankings = {c: [r.id for r in records_by_class[c][:quota[c]]] for c in seen}
    by_id = {r.id: r for recs in records_by_class.values() for r in recs}
    return build_memory(None, rankings, by_id, list(seen), list(seen), {"budget": budget}), \
        by_id


def bookkeeping(path: str, work_dir: str, candidates: int = 500) -> dict:
    """Load, split, set up the step-1 loader, write and read the memory (fresh process)."""
    out: dict = {}
    t0 = time.perf_counter()
    categories, records, _ = load_coco(path, Path(work_dir) / "images", check_files=False)
    out["load_s"] = time.perf_counter() - t0
    out["images"], out["boxes"] = len(records), int(sum(len(r.boxes) for r in records))
    out["categories"] = len(categories)
    out["splits"] = {}
    for split in SPLITS:
        t0 = time.perf_counter()
        classes = ClassSpace(categories, split)
        steps = [classes.step(t) for t in range(classes.num_steps)]
        class_s = time.perf_counter() - t0
        per_step, sets = [], []
        for sc in steps:
            t0 = time.perf_counter()
            sets.append(filter_for_classes(records, sc.new))
            per_step.append({"step": sc.step, "classes": len(sc.new), "images": len(sets[-1]),
                             "seconds": time.perf_counter() - t0})
        # the memory pass: images whose features are computed, all vs the candidate bound
        for s, sc, recs in zip(per_step, steps, sets):
            t0 = time.perf_counter()
            cand = candidate_ids(recs, sc.new, candidates, 0)
            s["candidates_s"] = time.perf_counter() - t0
            s["feature_images_all"] = len(recs)
            s["feature_images_bounded"] = len(set().union(*cand.values()))
        out["splits"][split] = {"class_space_s": class_s, "steps": per_step,
                                "split_s": sum(s["seconds"] for s in per_step)}
    out["load_and_split_s"] = out["load_s"] + sum(
        v["class_space_s"] + v["split_s"] for v in out["splits"].values())
    out["peak_after_split_gib"] = peak_gib()

    # step 1 of 40+10x4: the loader over the step's images with the step-0 memory replayed
    classes = ClassSpace(categories, "40+10x4")
    sc0, sc1 = classes.step(0), classes.step(1)
    step0 = filter_for_classes(records, sc0.new)
    by_class = {c: [] for c in sc0.new}
    for r in step0:
        for c in set(r.category_ids.tolist()):
            by_class[c].append(r)
    memory, by_id = _toy_memory(by_class, sc0.seen, MEMORY_BUDGET)
    cfg = copy.deepcopy(DEFAULTS)
    cfg["train"]["num_workers"] = 0
    new = filter_for_classes(records, sc1.new)
    t0 = time.perf_counter()
    loader = train_loader(cfg, classes, new, classes.labels(sc1.seen), memory, seed=0)
    batches = len(loader.batch_sampler)
    out["loader_setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_epoch = sum(1 for _ in loader.batch_sampler)
    out["sampler_epoch_s"] = time.perf_counter() - t0
    out["loader"] = {"new_images": len(new), "memory_images": len(memory),
                     "batches_per_epoch": batches}
    assert first_epoch == batches

    # the memory file: write, then read back (reading checks every image file exists)
    image_dir = Path(work_dir) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for r in memory.records.values():
        Path(r.path).touch()
    mem_path = Path(work_dir) / "memory.json"
    t0 = time.perf_counter()
    atomic_write_json(mem_path, memory.to_json(image_dir, categories, 0))
    out["memory_write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = Memory.from_json(mem_path, image_dir)
    out["memory_read_s"] = time.perf_counter() - t0
    out["memory_images"], out["memory_file_mib"] = len(back), mem_path.stat().st_size / 2**20
    out["peak_gib"] = peak_gib()
    return out


def ranking_time(candidates: list[int], limit: int = 100, dim: int = 256, seed: int = 0,
                 repeats: int = 3) -> dict:
    """Seconds for :func:`rank_classes` (herding) to rank ``limit`` images of one class among
    ``n`` candidates, for each ``n``, on random L2-normalised features of ``dim`` channels (the
    COCO preset's FPN width); best of ``repeats``."""
    rng = torch.Generator().manual_seed(seed)
    out = {}
    for n in candidates:
        vecs = torch.nn.functional.normalize(torch.randn(n, dim, generator=rng), dim=1)
        feats = {(i, 1): v for i, v in enumerate(vecs)}
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            rank_classes(feats, [1], "herding", limit)
            best = min(best, time.perf_counter() - t0)
        out[n] = {"seconds": best, "us_per_candidate": 1e6 * best / n}
    return out


def run_isolated(fn, *args):
    """``fn(*args)`` in a fresh spawned process, so that its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def scale(work_dir: str | Path, path: str | Path | None = None, candidates: int = 500,
          ranking_sizes=(5000, 10000, 20000, 50000, 100000), seed: int = 0,
          repeats: int = 2) -> dict:
    """The bookkeeping figures; ``path`` defaults to
    ``WORK_DIR/annotations/instances_train2017.json`` (generated when missing). pycocotools and
    incdet alternate ``repeats`` times, each in a fresh process; the fastest run of each counts
    (the machine is shared)."""
    work_dir = Path(work_dir)
    path, gen_s = ensure_file(path or work_dir / "annotations" / "instances_train2017.json",
                              seed)
    r = {"file": str(path), "file_mib": path.stat().st_size / 2**20, "generate_s": gen_s,
         "candidates_per_class": candidates}
    runs = {"pycocotools": [], "incdet": []}
    for _ in range(repeats):
        runs["pycocotools"].append(run_isolated(pycocotools_load, str(path)))
        runs["incdet"].append(run_isolated(bookkeeping, str(path), str(work_dir), candidates))
    r["pycocotools"] = min(runs["pycocotools"], key=lambda v: v["seconds"])
    r["incdet"] = min(runs["incdet"], key=lambda v: v["load_and_split_s"])
    r["all_runs_s"] = {"pycocotools": [v["seconds"] for v in runs["pycocotools"]],
                       "incdet_load_and_split": [v["load_and_split_s"] for v in runs["incdet"]]}
    r["ranking"] = ranking_time(list(ranking_sizes))
    r["load_and_split_over_pycocotools"] = (r["incdet"]["load_and_split_s"]
                                            / r["pycocotools"]["seconds"])
    small = r["ranking"][min(ranking_sizes)]
    large = r["ranking"][max(ranking_sizes)]
    r["ranking_linearity"] = large["us_per_candidate"] / small["us_per_candidate"]
    r["goals"] = {
        "load_and_split_within_2x_pycocotools": r["load_and_split_over_pycocotools"] <= 2,
        "below_4_gib": r["incdet"]["peak_gib"] < 4,
        "ranking_5000_within_1s": r["ranking"].get(5000, small)["seconds"] <= 1}
    return r


def _mean_gap(feats: dict, ranking: list[int], c: int, q: int, mu: torch.Tensor) -> float:
    picked = torch.stack([feats[(i, c)] for i in ranking[:q]]).double()
    return float(torch.linalg.norm(picked.mean(0) - mu))


def candidates_quality(cfg: dict, checkpoint: str | Path, step: int = 0,
                       bounds=(25, 50, 100, 200, None), progress: bool = False) -> dict:
    """What ``memory.candidates_per_class`` does to the memory on the built-in data: per bound,
    the herding objective of each new class's memory, ``||mean(memory features) - mean(all the
    class's features)||`` at the class's quota, averaged over the classes (lower is better; the
    class mean is over *all* its images, so a bounded sample is judged against the full class),
    with the same for a random memory as reference."""
    train_set, _, classes = load_experiment(cfg, progress)
    sc = classes.step(step)
    device = resolve_device(cfg["train"]["device"])
    model = model_from_checkpoint(load_checkpoint(checkpoint), cfg, checkpoint).to(device)
    records = filter_for_classes(train_set.records, sc.new)
    feats = roi_features(model, records, int(cfg["eval"]["batch_size"]), device,
                         int(cfg["memory"]["feature_size"]), progress)
    quota = quotas(list(sc.seen), cfg["memory"].get("budget"), cfg["memory"].get("per_class"))
    mus = {c: torch.stack([v for (i, k), v in feats.items() if k == c]).double().mean(0)
           for c in sc.new}
    seed = int(cfg["train"]["seed"])
    out = {"step": step, "quota": {str(c): quota[c] for c in sc.new},
           "images_per_class": {str(c): len([1 for (_, k) in feats if k == c]) for c in sc.new},
           "bounds": {}}
    for bound in bounds:
        cand = candidate_ids(records, sc.new, bound, seed)
        sub = {(i, c): v for (i, c), v in feats.items() if i in cand[c]}
        gaps = {}
        for method in ("herding", "random"):
            ranks = rank_classes(sub, sc.new, method, max(quota.values()), seed)
            gaps[method] = float(np.mean([_mean_gap(feats, ranks[c], c, quota[c], mus[c])
                                          for c in sc.new]))
        out["bounds"][str(bound)] = {"feature_images": len(set().union(*cand.values())),
                                     "gap_herding": gaps["herding"],
                                     "gap_random": gaps["random"]}
    return out


def section(out_dir: str | Path, cfg: dict, iters: int, repeats: int = 2,
            progress: bool = False) -> dict:
    """The benchmark section: :func:`scale` at ``OUT_DIR/scale``, then
    :func:`candidates_quality` on a step 0 of ``cfg`` (the built-in data) trained for ``iters``
    iterations at ``OUT_DIR/scale_quality_<iters>`` (trained when missing)."""
    r = scale(Path(out_dir) / "scale", repeats=repeats)
    folder = Path(out_dir) / f"scale_quality_{iters}"
    ckpt = folder / "step_0" / "checkpoint.pt"
    cfg = copy.deepcopy(cfg)
    cfg["train"]["max_iters"] = iters
    if not ckpt.is_file():
        train_cfg = copy.deepcopy(cfg)
        train_cfg["memory"]["budget"], train_cfg["memory"]["per_class"] = 0, None
        run_step(train_cfg, 0, folder, progress=progress)
    r["quality"] = candidates_quality(cfg, ckpt, progress=progress)
    r["quality"]["iters"] = iters
    return r


def summary(r: dict) -> list[str]:
    """The section's figures as printed lines."""
    p, b = r["pycocotools"], r["incdet"]
    return [
        f"[scale] {b['images']} images, {b['boxes']} boxes: pycocotools COCO() "
        f"{p['seconds']:.1f}s ({p['peak_gib']:.2f} GiB); load {b['load_s']:.1f}s, with class "
        f"spaces and every step of {' and '.join(SPLITS)} {b['load_and_split_s']:.1f}s = "
        f"{r['load_and_split_over_pycocotools']:.2f}x COCO(), peak {b['peak_gib']:.2f} GiB",
        f"[scale] step-1 loader set-up {b['loader_setup_s']:.2f}s; memory of "
        f"{b['memory_images']} images: write {b['memory_write_s']:.2f}s, read "
        f"{b['memory_read_s']:.2f}s",
        "[scale] herding 100 of n candidates: " + ", ".join(
            f"{n} {v['seconds']:.2f}s" for n, v in r["ranking"].items()),
        "[scale] goals met: " + ", ".join(f"{k} {v}" for k, v in r["goals"].items()),
        "[scale] candidates_per_class: ||memory mean - class mean|| herding / random: " +
        ", ".join(f"{k} {v['gap_herding']:.3f} / {v['gap_random']:.3f}"
                  for k, v in r["quality"]["bounds"].items())]
