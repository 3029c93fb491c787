"""Benchmarks (never timed tests): accuracy of the methods side by side and the cost of an
incremental iteration. ``tools/benchmark.py`` runs them and writes a JSON of results."""
from __future__ import annotations

from incdet.bench.accuracy import in_current_names, over_seeds, spread_text
from incdet.experiment.report import steps_table


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
    for name, goal in (("2step", {"incdet_no_memory": "≥ 0.85", "incdet_pseudo": "≥ 0.85",
                                  "incdet": "≥ 0.95"}),
                       ("4step", {"incdet_no_memory": "≥ 0.75", "incdet_pseudo": "≥ 0.75",
                                  "incdet": "≥ 0.90"}),
                       ("2step-disjoint", {}),
                       ("6step", {"incdet": "≥ 0.85"})):
        if name not in res:
            continue
        r = in_current_names(res[name])
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
        if name not in ("2step", "2step-disjoint"):
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
    if "merge" in res:
        lines += merge_rows(res["merge"])
    return "\n".join(lines + extra)


def merge_rows(r: dict) -> list[str]:
    """The merge section's figures (:mod:`incdet.bench.merge`) as rows of the figures table."""
    c, k = r["consolidation"], r["compression"]
    rows = [f"| merge: branch model consolidated into one tower, AP / branch's | "
            f"{_f(c['merged_ap'])} / {_f(c['branch_ap'])} = {c['ratio']:.2f}; images/s "
            f"{c['merged_images_per_second']:.1f} vs {c['branch_images_per_second']:.1f} "
            f"| ≥ 0.97 |"]
    for name, m in r["merge_two"].items():
        rows.append(f"| merge: A + B trained apart ({name.replace('_', ' ')}), A / teacher A, "
                    f"B / teacher B | {m['a_over_teacher_a']:.2f}, {m['b_over_teacher_b']:.2f}"
                    f" | ≥ 0.95 each |")
        rows.append(f"| merge: A + B ({name.replace('_', ' ')}), all-class AP / incdet without "
                    f"memory | {_f(m['all_ap'])} / {_f(r['incdet_without_memory_ap'])} = "
                    f"{m['all_over_incdet_without_memory']:.2f} | > 1 |")
    rows += [f"| compression: distilled student / same student on labels alone | "
             f"{_f(k['distilled_ap'])} / {_f(k['labels_only_ap'])} = "
             f"{k['distilled_over_labels_only']:.2f} | ≥ 1.05 |",
             f"| compression: distilled student / teacher | {_f(k['distilled_ap'])} / "
             f"{_f(k['teacher_ap'])} = {k['distilled_over_teacher']:.2f} | ≥ 0.9 |",
             f"| compression: student images/s / teacher's (CPU) | "
             f"{k['student_images_per_second']:.1f} / {k['teacher_images_per_second']:.1f} = "
             f"{k['speedup']:.2f} | ≥ 2 |"]
    for kind in ("fpn", "backbone"):
        f = r.get(f"branch_from_{kind}")
        if f:
            rows.append(f"| branch_from {kind}: new-class AP / incdet's (tower: "
                        f"{f['tower_new_over_incdet']:.2f}) | {_f(f['new_ap'])} / "
                        f"{_f(f['incdet_new_ap'])} = {f['new_over_incdet']:.2f}; images/s "
                        f"{f['images_per_second']:.1f} (tower "
                        f"{f['tower_images_per_second']:.1f}) | ≥ 0.7 |")
    b = r.get("consolidation_backbone")
    if b:
        rows.append(f"| merge: branch_from backbone model consolidated into one tower, AP / "
                    f"branch's; / incdet without memory | {_f(b['merged_ap'])} / "
                    f"{_f(b['branch_ap'])} = {b['ratio']:.2f}; "
                    f"{b['all_over_incdet_without_memory']:.2f} | ≥ 0.97 |")
    return rows
