"""The report of a protocol run: ``summary.json``, ``report.md`` and two plots.

``summary.json``::

    {"config": path, "split": "5+5", "methods": {method: [metrics.json of step 0, 1, ...]},
     "protocol": "standard" | "disjoint" | {method: protocol} (when the methods differ),
     "final_ap": {method: AP}, "ratio_to_joint": {method: AP / joint AP},
     "joint_reference": how joint was trained (equal compute by default)}

``report.md`` says which protocol ran (``data.disjoint_steps``; design.md, "Disjoint steps")
under its title.
``report.md`` has one table row per method and step (AP / AP50 / AP75 of old, new and all seen
classes, mean forgetting, training time and images/s) and the final ratios to ``joint``.
Plots: ``ap_over_steps.png`` (all-classes AP, solid, and old-class AP, dashed, per method) and
``per_class_ap.png`` (AP of every class at the last step per method; old classes on a grey
background, new ones on white).
"""
from __future__ import annotations

from pathlib import Path

import torch

from incdet.base.io import atomic_write_json, atomic_write_text
from incdet.data.dataset import read_image, to_tensor
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _mean_forgetting(m: dict):
    vals = [v for v in m.get("forgetting", {}).values() if v is not None]
    return sum(vals) / len(vals) if vals else None


PROTOCOLS = {
    "standard": "standard (an image with classes of several steps is trained at each of those "
                "steps, annotated for that step's classes)",
    "disjoint": "disjoint steps (data.disjoint_steps: every training image belongs to one step "
                "only; joint trains on all the images and boxes of steps 0..t)",
}


def protocol_of(results: dict[str, list[dict]]):
    """Which protocol the steps ran: ``"standard"``, ``"disjoint"``, or ``{method: protocol}``
    when the methods differ (metrics written before ``data.disjoint_steps`` are standard)."""
    per = {name: sorted({m.get("protocol", "standard") for m in steps})
           for name, steps in results.items() if steps}
    found = {p for ps in per.values() for p in ps}
    if len(found) == 1:
        return found.pop()
    return {name: "+".join(ps) for name, ps in per.items()}


def protocol_text(protocol) -> str:
    """The protocol of :func:`protocol_of`, in words."""
    if isinstance(protocol, dict):
        return "differs between methods: " + ", ".join(f"{n} {p}" for n, p in protocol.items())
    return PROTOCOLS.get(protocol, protocol)


def build_summary(results: dict[str, list[dict]], config: str | None = None,
                  split=None) -> dict:
    final = {name: steps[-1]["map"]["all"]["AP"] for name, steps in results.items() if steps}
    out = {"config": config, "split": split, "methods": results,
           "protocol": protocol_of(results), "final_ap": final}
    joint = final.get("joint")
    if joint and results["joint"][-1].get("joint_budget", "equal") == "step":
        # a one-step joint is weaker than the incremental run: no ratio is printed against it
        out["joint_reference"] = joint_rule(results["joint"][-1])
    elif joint:
        out["ratio_to_joint"] = {name: (v / joint if v is not None else None)
                                 for name, v in final.items()}
        out["joint_reference"] = joint_rule(results["joint"][-1])
    return out


def joint_rule(metrics: dict) -> str:
    """How the ``joint`` reference of a ratio was trained, in words."""
    iters = metrics["train"]["iterations"]
    if metrics.get("joint_budget", "equal") == "step":
        return (f"joint trained one step's budget ({iters} iterations): weaker than the "
                "incremental run, not an upper bound")
    return (f"joint trained from scratch on all seen classes for {iters} iterations, the "
            "incremental steps' budgets together (equal compute)")


def table(summary: dict, markdown: bool = False) -> str:
    """Per method and step: AP/AP50/AP75 of old, new and all classes, forgetting, time."""
    cols = ["method", "step", "old AP", "old AP50", "old AP75", "new AP", "new AP50", "new AP75",
            "all AP", "all AP50", "all AP75", "forgetting", "train s", "img/s"]
    rows = []
    for name, steps in summary["methods"].items():
        for m in steps:
            row = [name, str(m["step"])]
            for g in ("old", "new", "all"):
                row += [_fmt(m["map"][g][k]) for k in ("AP", "AP50", "AP75")]
            trained = m["train"].get("iterations", 1) > 0  # an imported step 0 trained none
            row += [_fmt(_mean_forgetting(m)),
                    f"{m['train']['seconds']:.0f}" if trained else "–",
                    f"{m['train']['images_per_second']:.1f}" if trained else "–"]
            rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    ratios = summary.get("ratio_to_joint")
    if ratios:
        text = ", ".join(f"{n} {_fmt(v, '.2f')}" for n, v in ratios.items() if n != "joint")
        lines += ["", f"final all-classes AP / joint: {text}",
                  f"({summary.get('joint_reference', 'joint')})"]
    elif "joint_reference" in summary:  # a one-step joint: no ratio against it
        lines += ["", f"no ratio to joint: {summary['joint_reference']}"]
    elif "joint" not in summary["methods"]:
        lines += ["", "no ratio to joint: joint (the upper bound: trained from scratch on every "
                  "class with the run's total compute) is not among the methods"]
    if "protocol" in summary:
        lines += ["", f"protocol: {protocol_text(summary['protocol'])}"]
    return "\n".join(lines)


def _ap(value):
    """An AP from full step metrics (``{"AP": ...}``) or a benchmark's summary (a number)."""
    return value["AP"] if isinstance(value, dict) else value


def ap_when_learned(steps: list[dict]) -> float | None:
    """Mean AP over every class at the step that added it (its group's AP then, weighted by the
    group's classes): what the last step would reach if no class were forgotten and none improved
    after its own step. None when a step lacks its class count or AP (older summaries)."""
    total = weight = 0.0
    for s in steps:
        n = s.get("new_classes", len(s.get("classes", {}).get("new", ())))
        ap = _ap(s["map"].get("new"))
        if not n or ap is None:
            return None
        total, weight = total + n * ap, weight + n
    return total / weight if weight else None


def steps_table(title: str, per: dict[str, list[list[dict]]]) -> list[str]:
    """A protocol's course per method (``per``: method -> one list of step metrics per seed):
    AP over all seen classes after every step, every class's AP at its own step
    (:func:`ap_when_learned`), and at the last step each earlier step group's forgetting (its AP
    when learned minus its AP at the end); mean over the seeds, with min–max where there are
    several. Empty for methods with one step (joint's last step only)."""
    per = {m: runs for m, runs in per.items() if runs and len(runs[0]) > 1}
    if not per:
        return []
    num = max(len(s) for runs in per.values() for s in runs)

    def cell(vals: list) -> str:
        vals = [_ap(v) for v in vals]
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        mean = sum(vals) / len(vals)
        return f"{mean:.3f}" + (f" ({min(vals):.3f}–{max(vals):.3f})" if len(vals) > 1 else "")

    head = ([f"after step {t}" for t in range(num)] + ["each class when learned"] +
            [f"forgetting of step {g}" for g in range(num - 1)])
    lines = [f"{title}AP over all seen classes after each step; every class's AP at the step "
             "that added it (the last step's AP if nothing were forgotten and nothing improved "
             "later); each step group's forgetting at the last step (its AP when learned − at "
             "the end). Mean over seeds, min–max", "",
             "| method | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for m, runs in per.items():
        aps = [cell([s[t]["map"]["all"] for s in runs if t < len(s)]) for t in range(num)]
        aps.append(cell([ap_when_learned(s) for s in runs]))
        forgot = [cell([s[-1]["forgetting"].get(f"step_{g}") for s in runs])
                  for g in range(num - 1)]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(aps + forgot) + " |")
    return lines


def plot_ap_over_steps(summary: dict, path: Path) -> None:
    import matplotlib  # heavy: loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: loaded only to draw

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, steps) in enumerate(summary["methods"].items()):
        colour = f"C{i}"
        xs = [m["step"] for m in steps]
        ax.plot(xs, [m["map"]["all"]["AP"] for m in steps], "-o", color=colour,
                label=f"{name} (all)")
        old = [(m["step"], m["map"]["old"]["AP"]) for m in steps
               if m["map"]["old"]["AP"] is not None]
        if old:
            ax.plot(*zip(*old), "--s", color=colour, alpha=0.7, label=f"{name} (old)")
    ax.set_xlabel("step")
    ax.set_ylabel("COCO AP")
    ax.set_xticks(sorted({m["step"] for s in summary["methods"].values() for m in s}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("AP over steps: all seen classes (solid), old classes (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class_ap(summary: dict, names: dict[str, str], path: Path) -> None:
    import matplotlib  # heavy: loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: loaded only to draw

    methods = {n: s[-1] for n, s in summary["methods"].items() if s}
    if not methods:
        return
    ref = max(methods.values(), key=lambda m: m["step"])
    old = [str(c) for c in ref["classes"]["old"]]
    new = [str(c) for c in ref["classes"]["new"]]
    classes = old + new
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) * len(methods) + 2), 4))
    if old:
        ax.axvspan(-0.5, len(old) - 0.5, color="0.9", zorder=0)
    for i, (name, m) in enumerate(methods.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(classes))]
        ys = [m["per_class_ap"].get(c) or 0.0 for c in classes]
        ax.bar(xs, ys, width, label=name, color=f"C{i}", zorder=2)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels([names.get(c, c) for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("AP")
    ax.set_xlim(-0.5, len(classes) - 0.5)
    ax.set_title(f"per-class AP at step {ref['step']}: old classes (grey) | new classes (white)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_detections(work_dir: Path, methods: list[str], records, path: Path,
                    score_thresh: float = 0.3) -> None:
    """The same validation images (``records``) with the detections of each method's last step,
    side by side (one row per image, one column per method): boxes and class names, classes of
    earlier steps in blues, the last step's classes in oranges."""
    import matplotlib  # heavy: loaded only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: loaded only to draw
    from matplotlib.patches import Rectangle  # heavy: loaded only to draw

    images = [read_image(r.path) for r in records]
    fig, axes = plt.subplots(len(images), len(methods), squeeze=False,
                             figsize=(3.2 * len(methods), 3.2 * len(images)))
    for col, method in enumerate(methods):
        step_dirs = sorted((work_dir / method).glob("step_*/checkpoint.pt"),
                           key=lambda p: int(p.parent.name.split("_")[1]))
        ckpt = load_checkpoint(step_dirs[-1])
        model = model_from_checkpoint(ckpt)
        order = [int(c) for c in ckpt["class_order"]]
        last = {int(c) for c in ckpt["steps"][ckpt["step"]]}
        old_ids = [c for c in order[:sum(ckpt["head_layout"])] if c not in last]
        shade = {c: plt.cm.Blues(0.55 + 0.4 * i / max(1, len(old_ids) - 1))
                 for i, c in enumerate(old_ids)}
        shade.update({c: plt.cm.Oranges(0.5 + 0.4 * i / max(1, len(last) - 1))
                      for i, c in enumerate(sorted(last))})
        with torch.no_grad():
            outputs = model([to_tensor(img) for img in images])
        for row, (img, out) in enumerate(zip(images, outputs)):
            ax = axes[row][col]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{method} (step {ckpt['step']})", fontsize=10)
            for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(),
                                         out["scores"].tolist()):
                if score < score_thresh:
                    continue
                cid = order[label]
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                       edgecolor=shade[cid]))
                ax.text(x0, y0, f"{ckpt['names'][str(cid)]} {score:.2f}", fontsize=6,
                        color="white", va="bottom",
                        bbox={"facecolor": shade[cid], "pad": 0.5, "lw": 0})
    fig.suptitle(f"detections (score ≥ {score_thresh}): earlier steps' classes in blue, "
                 "the last step's in orange", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, list[dict]], work_dir: str | Path, names: dict[str, str],
                 config: str | None = None, split=None, val_records=None) -> dict:
    """Write ``summary.json``, ``report.md`` and the plots into ``work_dir``; returns the
    summary (with ``files``: the paths written). ``val_records``: a few validation images for
    ``detections.png`` (each method's last step on the same images)."""
    work_dir = Path(work_dir)
    summary = build_summary(results, config, split)
    plots = {"ap_over_steps": work_dir / "ap_over_steps.png",
             "per_class_ap": work_dir / "per_class_ap.png"}
    plot_ap_over_steps(summary, plots["ap_over_steps"])
    plot_per_class_ap(summary, names, plots["per_class_ap"])
    pictures = []
    if val_records:
        plots["detections"] = work_dir / "detections.png"
        plot_detections(work_dir, list(results), list(val_records), plots["detections"])
        pictures = ["", "![detections of each method after the last step](detections.png)"]
    steps = steps_table("", {m: [s] for m, s in results.items()})
    lines = [f"# incdet protocol report: {config or ''} (split {split})", "",
             f"Protocol: {protocol_text(summary['protocol'])}.", "",
             table({k: v for k, v in summary.items() if k != "protocol"}, markdown=True), "",
             "Forgetting: mean over earlier steps of (their AP when learned − their AP now).", "",
             *(steps + [""] if max(map(len, results.values()), default=0) > 2 else []),
             "![AP over steps](ap_over_steps.png)", "", "![per-class AP](per_class_ap.png)",
             *pictures, ""]
    atomic_write_text(work_dir / "report.md", "\n".join(lines))
    atomic_write_json(work_dir / "summary.json", summary)
    summary["files"] = {"summary": str(work_dir / "summary.json"),
                        "report": str(work_dir / "report.md"),
                        **{k: str(v) for k, v in plots.items()}}
    return summary
