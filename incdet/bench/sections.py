"""Benchmarks (never timed tests): accuracy of the methods side by side and the cost of an
incremental iteration. ``tools/benchmark.py`` runs them and writes a JSON of results."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from incdet.base.config import differing_keys, load_config
from incdet.base.errors import UserError
from incdet.data.records import filter_for_classes
from incdet.experiment import methods
from incdet.experiment.protocol import run_protocol, share_step0
from incdet.experiment.report import steps_table
from incdet.experiment.step import load_experiment, new_class_batch
from incdet.train.engine import batch_to, build_optimizer, seed_everything


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


def iteration_cost(cfg: dict, iters: int = 10, batch_size: int = 8, progress: bool = False) -> dict:
    """Seconds per training iteration on one fixed batch: plain (step-0 loss, no teacher) vs
    ``incdet`` (the same student plus a teacher forward and distillation), measured
    alternately in one process so that machine noise hits both alike."""
    seed_everything(0)
    cfg = copy.deepcopy(cfg)
    classes, sc, plan, images, targets = new_class_batch(cfg, batch_size, progress=progress)
    previous_model = methods.build_model(cfg["model"], [len(sc.old)])
    previous = {"model": previous_model.state_dict(), "head_layout": [len(sc.old)]}
    student = methods.build_student(cfg, sc, plan, previous)
    teacher = methods.build_teacher(cfg, previous)
    plain_plan = methods.plan_step("finetune", classes, sc)
    plain = methods.make_criterion(cfg, student, None, plain_plan, classes, sc)
    incdet = methods.make_criterion(cfg, student, teacher, plan, classes, sc)
    optimizer = build_optimizer(student, dict(cfg["train"], lr=1e-4))
    student.train()

    def one(fn) -> float:
        t0 = time.perf_counter()
        losses = fn(list(images), list(targets))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return time.perf_counter() - t0

    for fn in (plain, incdet):  # warm-up
        one(fn)
    times = {"plain": [], "incdet": []}
    for _ in range(iters):
        times["plain"].append(one(plain))
        times["incdet"].append(one(incdet))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch_size": len(images), "iters": iters, "plain_s": med["plain"],
            "incdet_s": med["incdet"], "ratio": med["incdet"] / med["plain"]}


def training_throughput(cfg: dict, iters: int = 30, progress: bool = False,
                        device: str | torch.device = "cpu") -> dict:
    """Images/s of the step-0 training loop (data loading included) over ``iters`` iterations,
    on ``device`` (with ``train.amp`` and ``train.channels_last`` as the config sets them)."""
    from incdet.experiment.step import train_loader
    from incdet.train.engine import autocast_dtype, resolve_device

    device = resolve_device(device, "device")
    seed_everything(0)
    train_set, _, classes = load_experiment(cfg, progress)
    sc = classes.step(0)
    plan = methods.plan_step("joint", classes, sc)
    records = filter_for_classes(train_set.records, plan.train_classes)
    tcfg = cfg["train"]
    loader = train_loader(cfg, classes, records, plan.label_space, None, seed=0)
    memory_format = torch.channels_last if tcfg.get("channels_last") else torch.contiguous_format
    model = methods.build_student(cfg, sc, plan, None).to(device, memory_format=memory_format)
    loss_fn = methods.make_criterion(cfg, model, None, plan, classes, sc)
    optimizer = build_optimizer(model, tcfg)
    amp = autocast_dtype(tcfg, device)
    model.train()
    seen, t0, warm = 0, None, 3
    for i, (images, targets) in enumerate(loader):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, seen = time.perf_counter(), 0
        images, targets = batch_to(images, targets, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = loss_fn(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        seen += len(images)
        if i >= warm + iters - 1:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"iters": iters, "batch_size": int(tcfg["batch_size"]), "device": str(device),
            "images_per_second": seen / seconds, "threads": torch.get_num_threads()}


def herding_time(num_images: list[int], classes: int = 10, dim: int = 64, quota: int = 20,
                 boxes_per_image: float = 2.5, seed: int = 0, repeats: int = 3) -> dict:
    """Seconds to rank every class by herding (up to ``quota`` each) for several dataset sizes,
    on random L2-normalised (image, class) features of ``dim`` channels (the FPN width)."""
    from incdet.train.memory import rank_classes

    rng = torch.Generator().manual_seed(seed)
    out = {}
    for n in num_images:
        feats = {}
        pairs = int(n * boxes_per_image)
        img = torch.randint(0, n, (pairs,), generator=rng).tolist()
        cls = torch.randint(0, classes, (pairs,), generator=rng).tolist()
        vecs = torch.nn.functional.normalize(torch.randn(pairs, dim, generator=rng), dim=1)
        for i, c, v in zip(img, cls, vecs):
            feats[(i, c)] = v
        best = float("inf")
        for _ in range(repeats):  # best of a few runs: the machine is shared and noisy
            t0 = time.perf_counter()
            rank_classes(feats, list(range(classes)), "herding", quota)
            best = min(best, time.perf_counter() - t0)
        out[n] = {"pairs": len(feats), "seconds": best}
    return out


def _f(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    """The README's figures table from a benchmark JSON."""
    res = report["results"]
    lines = ["| figure | value | goal |", "|---|---|---|"]
    extra: list[str] = []  # the long protocols' tables, after the figures
    if "throughput" in res:
        lines.append(f"| step-0 training throughput (CPU preset, batch "
                     f"{res['throughput']['batch_size']}) | "
                     f"{res['throughput']['images_per_second']:.1f} images/s | ≥ 20 |")
    if "cost" in res:
        c = res["cost"]
        lines.append(f"| incremental iteration / plain iteration (same batch) | "
                     f"{c['ratio']:.2f}× ({c['incdet_s']:.3f} s vs {c['plain_s']:.3f} s) "
                     "| ≤ 1.4× |")
    if "herding" in res:
        h = {k: v for k, v in res["herding"].items() if isinstance(v, dict) and "pairs" in v}
        ks = sorted(h, key=int)
        lines.append("| herding time at N / 2N / 4N images | " + " / ".join(
            f"{h[k]['seconds']:.2f} s ({h[k]['pairs']} pairs)" for k in ks) + " | linear |")
    for name, goal in (("2step", {"incdet": "≥ 0.85", "incdet_pseudo": "≥ 0.85",
                                  "incdet_memory": "≥ 0.95"}),
                       ("4step", {"incdet": "≥ 0.75", "incdet_pseudo": "≥ 0.75",
                                  "incdet_memory": "≥ 0.90"}),
                       ("6step", {"incdet_memory": "≥ 0.85"})):
        if name not in res:
            continue
        r = res[name]
        if "seeds" not in r:  # a result written before --seeds: one seed
            r = over_seeds({r.get("seed", 0): r})
        per_class = res[name].get("iters_per_class")
        budget = (f"{per_class} iterations per class a step adds" if per_class else
                  f"the steps' {res[name].get('iters_per_step')}-iteration budgets")
        final, ratio = r["final_ap"], r.get("ratio_to_joint", {})
        lines.append(f"| {name}: joint AP (all classes; equal compute: {budget} together) | "
                     f"{spread_text(final.get('joint'))} | reference |")
        for m, ap in final.items():
            if m == "joint":
                continue
            lines.append(f"| {name}: {m} AP, and / joint | {spread_text(ap)}; "
                         f"{spread_text(ratio.get(m), '.2f')} | "
                         f"{goal.get(m.split('@')[0], '–')} |")
        for seed, curve in r.get("joint_curve", {}).items():
            points = " / ".join(f"{_f(c['AP'])} at {c['iteration']}" for c in curve)
            lines.append(f"| {name}: joint AP during its run (seed {seed}) | {points} | "
                         "converged if flat |")
        for m, v in r["step0_retention"].items():
            if m != "joint":
                lines.append(f"| {name}: {m} step-0 classes' AP at the last step / at step 0 | "
                             f"{spread_text(v, '.2f')} | "
                             f"{'≤ 0.3' if m == 'finetune' else 'high'} |")
        if name != "2step":
            per: dict[str, list[list[dict]]] = {}  # variant -> per seed, its steps
            for one in r["seeds"].values():  # over_seeds keeps each seed's result
                for m, steps in one.get("steps", {}).items():
                    per.setdefault(m, []).append(steps)
            extra += ["", *steps_table(f"{name}: ", per)]
    if "inference" in res:
        r = res["inference"]
        ips = r["images_per_second"]
        lines.append("| inference images/s (1 image per call, " + str(r["image_size"]) + " px): "
                     + ", ".join(ips) + " | " + " / ".join(f"{v:.1f}" for v in ips.values())
                     + " | – |")
        lines.append(f"| grown head / plain torchvision RetinaNet (same classes, inference) | "
                     f"{r['grown_over_plain']:.3f} (fused: {r['fused_over_plain']:.3f}) | ≥ 0.97 |")
        if "onnxruntime_over_eager" in r:
            lines.append(f"| onnxruntime / eager inference | {r['onnxruntime_over_eager']:.2f}× "
                         "| ≥ 1 |")
    return "\n".join(lines + extra)


def inference_speed(ckpt_path: str | Path, num_images: int = 64, repeats: int = 3,
                    export_dir: str | Path | None = None) -> dict:
    """Images/s of a grown model at inference, one image per call, on validation-like images:
    the model as trained (one classifier conv per step), the same model fused into torchvision's
    head (what :func:`incdet.deploy.export.load_detector` returns), and a plain torchvision RetinaNet
    with the same total number of classes and the same weights. With ``export_dir``, also the
    TorchScript and onnxruntime exports. Rounds alternate between the variants and the best
    round counts, so that machine noise hits them alike."""
    from incdet.base.config import with_defaults
    from incdet.data import synthetic
    from incdet.data.dataset import to_tensor
    from incdet.deploy.export import export, onnx_session, quiet_warnings, to_torchvision
    from incdet.experiment.step import model_from_checkpoint
    from incdet.model.builder import build_model
    from incdet.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    mcfg = with_defaults(ckpt["config"])["model"]
    grown = model_from_checkpoint(ckpt)
    fused = to_torchvision(grown)
    plain = to_torchvision(build_model(mcfg, [sum(ckpt["head_layout"])]))
    plain.load_state_dict(fused.state_dict())
    size = int(mcfg["max_size"])
    images = [to_tensor(np.array(synthetic.render_image(1, 9, i, size)[0]))
              for i in range(num_images)]
    runners = {"grown": lambda x: grown([x]), "grown_fused": lambda x: fused([x]),
               "plain_torchvision": lambda x: plain([x])}
    if export_dir is not None:
        export_dir = Path(export_dir)
        export(ckpt_path, "torchscript", export_dir / "model.pt", check_images=images[:2])
        with quiet_warnings():
            scripted = torch.jit.load(str(export_dir / "model.pt"))
        runners["torchscript"] = lambda x: scripted(x)
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is not None:  # optional: the export extra
            export(ckpt_path, "onnx", export_dir / "model.onnx", check_images=images[:2])
            sess = onnx_session(export_dir / "model.onnx")
            runners["onnxruntime"] = lambda x: sess.run(None, {"image": x.numpy()})
    best = {k: float("inf") for k in runners}
    with torch.no_grad():
        for fn in runners.values():  # warm-up
            for x in images[:4]:
                fn(x)
        for _ in range(repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                for x in images:
                    fn(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    ips = {k: num_images / v for k, v in best.items()}
    out = {"images": num_images, "image_size": size, "threads": torch.get_num_threads(),
           "images_per_second": ips,
           "grown_over_plain": ips["grown"] / ips["plain_torchvision"],
           "fused_over_plain": ips["grown_fused"] / ips["plain_torchvision"],
           "checkpoint": str(ckpt_path), "head_layout": list(ckpt["head_layout"])}
    if "onnxruntime" in ips:
        out["onnxruntime_over_eager"] = ips["onnxruntime"] / ips["grown_fused"]
    return out


def pretrained(cfg: dict, work_dir: str | Path, variants: dict[str, list[str]],
               progress: bool = True, cost_iters: int = 10) -> dict:
    """"Add classes to a detector you already have", on the built-in data.

    1. Train a step-0 model on the split's first classes (``cfg``, e.g. shapes_2step: 5 + 5).
    2. Save what a plain torchvision user would have: the weights in a RetinaNet built from
       torchvision's own head classes (:func:`incdet.deploy.export.to_torchvision`), as a state dict.
    3. Rebuild that torchvision model, load the state dict and import it
       (:func:`incdet.experiment.importer.import_detector`), evaluated on the validation set.
    4. Train step 1 from the import for each variant (e.g. ``branch``, ``incdet``, ``finetune``)
       with only the new classes' images and no memory (the old data is gone).

    Returns old / new / all AP per variant, old-class retention against the imported model, the
    step's seconds, and the iteration cost of ``branch`` and ``incdet`` on one batch."""
    from incdet.base.config import apply_overrides
    from incdet.deploy.export import to_torchvision
    from incdet.experiment.importer import import_detector
    from incdet.experiment.step import model_from_checkpoint, run_step
    from incdet.model.builder import build_model
    from incdet.model.checkpoint import load_checkpoint

    work_dir = Path(work_dir)
    base = copy.deepcopy(cfg)
    apply_overrides(base, ["incremental.method=incdet", "memory.budget=0"])
    m0 = run_step(base, 0, work_dir / "trained", resume=True, progress=progress)
    state_path = work_dir / "torchvision_state_dict.pt"
    trained = load_checkpoint(work_dir / "trained" / "step_0" / "checkpoint.pt")
    if not state_path.is_file():
        plain = to_torchvision(model_from_checkpoint(trained))
        torch.save(plain.state_dict(), state_path)
    # the user's side: a torchvision RetinaNet of the same layout, their saved weights loaded
    user_model = to_torchvision(build_model(base["model"], trained["head_layout"]))
    user_model.load_state_dict(torch.load(state_path, weights_only=True))
    _, _, classes = load_experiment(base, progress=False)
    slots = [{"id": c, "name": classes.names[c]} for c in classes.steps[0]]
    imported_dir = work_dir / "imported"
    if (imported_dir / "step_0" / "metrics.json").is_file():
        with open(imported_dir / "step_0" / "metrics.json") as f:
            mi = json.load(f)
    else:
        mi = import_detector(user_model, slots, base, imported_dir, str(state_path),
                             evaluate=True, progress=progress)
    imported_cfg = load_config(imported_dir / "step_0" / "config.yaml")
    imported_cfg["split"] = base["split"]
    imported_ap = mi["map"]["all"]["AP"]
    out = {"trained_step0_ap": m0["map"]["all"]["AP"], "imported_ap": imported_ap,
           "variants": {}}
    for name, overrides in variants.items():
        vcfg = copy.deepcopy(imported_cfg)
        apply_overrides(vcfg, overrides + ["memory.budget=0"])
        vdir = work_dir / name
        share_step0(imported_dir, vdir, vcfg, progress)
        m = run_step(vcfg, 1, vdir, resume=True, progress=progress)
        old = m["map"]["old"]["AP"]
        out["variants"][name] = {
            "old": old, "new": m["map"]["new"]["AP"], "all": m["map"]["all"]["AP"],
            "old_retention": old / imported_ap if imported_ap else None,
            "seconds": m["train"]["seconds"], "iterations": m["train"]["iterations"]}
    out["cost"] = _branch_cost(imported_cfg, load_checkpoint(imported_dir / "step_0" /
                                                             "checkpoint.pt"), cost_iters)
    return out


def _branch_cost(cfg: dict, previous: dict, iters: int, batch_size: int = 8) -> dict:
    """Seconds per training iteration of ``branch`` (frozen backbone, own tower, no teacher)
    and ``incdet`` (whole student plus a teacher) on one fixed batch, alternating."""
    seed_everything(0)
    fns, optimizers = {}, {}
    for method in ("branch", "incdet"):
        mcfg = copy.deepcopy(cfg)
        mcfg["incremental"]["method"] = method
        classes, sc, plan, *batch = new_class_batch(cfg, batch_size, method)
        student = methods.build_student(mcfg, sc, plan, previous)
        teacher = methods.build_teacher(mcfg, previous) if plan.uses_teacher else None
        criterion = methods.make_criterion(mcfg, student, teacher, plan, classes, sc)
        optimizers[method] = build_optimizer(student, dict(mcfg["train"], lr=1e-4))
        student.train()
        from incdet.model.builder import keep_frozen_norms

        keep_frozen_norms(student)
        fns[method] = (criterion, batch)

    def one(method: str) -> float:
        criterion, (images, targets) = fns[method]
        t0 = time.perf_counter()
        losses = criterion(list(images), list(targets))
        optimizers[method].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[method].step()
        return time.perf_counter() - t0

    for m in fns:  # warm-up
        one(m)
    times = {m: [] for m in fns}
    for _ in range(iters):
        for m in fns:
            times[m].append(one(m))
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {"batch_size": len(batch[0]), "iters": iters, "branch_s": med["branch"],
            "incdet_s": med["incdet"], "branch_over_incdet": med["branch"] / med["incdet"]}


def model_cost(cfg: dict, device: str | torch.device = "auto", precisions=("fp32", "bf16"),
               iters: int = 10, batch_size: int = 16, progress: bool = False) -> dict:
    """Seconds per training iteration, model only (loss, backward, optimizer step), on one fixed
    batch on ``device``, the variants alternating so that machine noise hits all alike:

    * ``incdet_step0``: incdet's step-0 model with its focal loss (a step-0 batch);
    * ``incdet_step1``: the step-1 student and its teacher (distillation included);
    * ``branch``: a ``branch`` step (frozen backbone, own tower, no teacher);
    * ``tv_v1`` / ``tv_v2``: torchvision's stock ``retinanet_resnet50_fpn`` and ``_v2`` with
      their own losses, as many classes as step 1 and the same input size as ``cfg``'s model.

    Each in every precision of ``precisions`` (``fp32``, ``bf16``: autocast). Returns the
    median seconds per variant and precision, the images/s, and ``speedup_over_tv_v2``
    (torchvision v2's seconds / the variant's, > 1: faster than torchvision), plus the peak
    GPU memory of the whole measurement on CUDA."""
    from incdet.experiment.importer import build_torchvision
    from incdet.model.builder import keep_frozen_norms
    from incdet.train.engine import resolve_device

    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        raise UserError(f"precision {bad[0]!r}: choose fp32 or bf16")
    device = resolve_device(device, "device")
    seed_everything(0)
    memory_format = (torch.channels_last if cfg["train"].get("channels_last")
                     else torch.contiguous_format)

    classes, sc, plan, *batch1 = new_class_batch(cfg, batch_size, "incdet", 1, progress)
    _, sc0, plan0, *batch0 = new_class_batch(cfg, batch_size, "incdet", 0)
    _, _, plan_b, *batch_b = new_class_batch(cfg, batch_size, "branch", 1)
    previous = {"model": methods.build_model(cfg["model"], [len(sc.old)]).state_dict(),
                "head_layout": [len(sc.old)]}
    runs = {}  # variant -> (model, loss function of (images, targets), batch)

    def incdet_variant(name, method, step_classes, step_plan, batch, prev):
        vcfg = copy.deepcopy(cfg)
        vcfg["incremental"]["method"] = method
        student = methods.build_student(vcfg, step_classes, step_plan, prev)
        student = student.to(device, memory_format=memory_format)
        teacher = None
        if step_plan.uses_teacher:
            teacher = methods.build_teacher(vcfg, prev).to(device, memory_format=memory_format)
        criterion = methods.make_criterion(vcfg, student, teacher, step_plan, classes,
                                           step_classes)
        runs[name] = (student, criterion, batch_to(*batch, device))

    incdet_variant("incdet_step0", "incdet", sc0, plan0, batch0, None)
    incdet_variant("incdet_step1", "incdet", sc, plan, batch1, previous)
    incdet_variant("branch", "branch", sc, plan_b, batch_b, previous)
    size = {"min_size": cfg["model"]["min_size"], "max_size": cfg["model"]["max_size"]}
    for name, arch in (("tv_v1", "retinanet_resnet50_fpn"), ("tv_v2", "retinanet_resnet50_fpn_v2")):
        model = build_torchvision(arch, len(sc.seen))
        model.transform.min_size, model.transform.max_size = (size["min_size"],), size["max_size"]
        model = model.to(device, memory_format=memory_format)
        runs[name] = (model, model, batch_to(*batch1, device))
    optimizers = {}
    for name, (model, _, _) in runs.items():
        optimizers[name] = build_optimizer(model, dict(cfg["train"], lr=1e-5))
        model.train()
        keep_frozen_norms(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one(name: str, precision: str) -> float:
        _, loss_fn, (images, targets) = runs[name]
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = loss_fn(list(images), list(targets))
        optimizers[name].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[name].step()
        sync()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"device": str(device), "batch_size": len(batch1[0]), "iters": iters,
           "image_size": size, "seconds": {}, "images_per_second": {},
           "speedup_over_tv_v2": {}}
    for precision in precisions:
        for name in runs:  # warm-up (cuDNN autotuning, allocator)
            one(name, precision)
        times = {name: [] for name in runs}
        for _ in range(iters):
            for name in runs:
                times[name].append(one(name, precision))
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        out["seconds"][precision] = med
        out["images_per_second"][precision] = {n: out["batch_size"] / s for n, s in med.items()}
        out["speedup_over_tv_v2"][precision] = {n: med["tv_v2"] / s for n, s in med.items()}
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
