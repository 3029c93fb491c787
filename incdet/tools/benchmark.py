"""Benchmarks of incdet on the built-in dataset; writes a JSON of results and prints a table.

    python tools/benchmark.py [--quick] [--regime scratch|pretrained] [--work-dir runs/benchmark]
                              [--sections throughput,cost,...] [--methods incdet,finetune,...]

Accuracy sections train every method with the same iteration budget per step
(``--iters``); figures are only comparable between runs with the same budget, config and seed,
which the JSON records. Methods are named as ``tools/run_protocol.py`` names them
(:data:`incdet.experiment.protocol.VARIANTS`); each variant's folder and result keys carry its
name.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json
from incdet.bench import accuracy, herding, inference, model_cost, pretrained, scale, training_cost
from incdet.bench.markdown import markdown
from incdet.bench.merge import merge_benchmark
from incdet.experiment.loaders import load_experiment
from incdet.experiment.methods import METHODS, incremental_iterations
from incdet.experiment.protocol import VARIANTS, method_variants, run_protocol
from incdet.tools.cli import (
    add_device,
    add_renamed,
    deprecated,
    device_overrides,
    main_guard,
    setup_logging,
)

SECTIONS = ("throughput", "cost", "herding", "2step", "2step-disjoint", "4step", "6step",
            "inference", "pretrained", "gpu", "scale", "merge")
PROTOCOLS = {"2step": "shapes_2step", "4step": "shapes_4step", "6step": "shapes_6step",
             # the 2step protocol with data.disjoint_steps: every training image in one step
             "2step-disjoint": "shapes_2step_disjoint"}
# --regime: where a section's preset comes from. scratch: configs/NAME.yaml (the backbone trained
# from scratch); pretrained: configs/pretrained/NAME.yaml (the same protocol from torchvision's
# ImageNet MobileNetV2 with the recipe measured for it)
REGIMES = {"scratch": "configs", "pretrained": "configs/pretrained"}
# the methods' names of this tool before they became run_protocol's (VARIANTS), still accepted
RENAMED_METHODS = {"incdet_memory": "incdet"}
# the methods that keep no exemplar memory run with memory.budget=0, as they always have here
# (it changes nothing they train, and their step folders keep their configs)
NO_MEMORY = tuple(m for m in METHODS if m != "incdet")
# the pretrained section's variants: step 1 from an imported step-0 detector, no memory
PRETRAINED = {"branch": ["incremental.method=branch"], "incdet": ["incremental.method=incdet"],
              "incdet_pseudo": ["incremental.method=incdet", "incremental.pseudo_labels=true"],
              "finetune": ["incremental.method=finetune"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_renamed(parser, "--work-dir", "--out", default=None, metavar="DIR",
                help="results folder: benchmark.json and each section's experiment folders "
                     "(default runs/benchmark, --quick: runs/benchmark_quick; --regime "
                     "pretrained adds _pretrained)")
    parser.add_argument("--regime", choices=tuple(REGIMES), default="scratch",
                        help="scratch: the presets configs/NAME.yaml (backbone trained from "
                             "scratch); pretrained: configs/pretrained/NAME.yaml (ImageNet "
                             "MobileNetV2 from the torch hub cache, `make weights`)")
    parser.add_argument("--quick", action="store_true",
                        help="small budgets: every section in under 10 minutes "
                             "(figures are noise-level)")
    parser.add_argument("--iters", type=int, help="training iterations per step (all methods)")
    parser.add_argument("--iters-per-class", type=int, metavar="N",
                        help="accuracy sections: a step's budget is N iterations per class it "
                             "adds (train.iters_per_class) instead of --iters per step; the "
                             "equal-compute joint trains N times all the classes")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--methods", default="incdet,incdet_no_memory,finetune,joint",
                        help="accuracy sections' variants, comma-separated, from: "
                             + ", ".join(VARIANTS) + " (as tools/run_protocol.py names them: "
                             "incdet with the config's exemplar memory, incdet_no_memory and "
                             "incdet_pseudo without; the others keep none); NAME@key=value@... "
                             "adds overrides to one variant, e.g. "
                             "incdet@memory.replay_mode=share (default: %(default)s; "
                             "incdet_memory is the former name of incdet, deprecated)")
    parser.add_argument("--joint-reference", metavar="METRICS_JSON",
                        help="without joint among --methods: take joint's AP from this finished "
                             "step-0 run on all classes with the same recipe and the "
                             "equal-compute budget (the incremental steps' budgets together), "
                             "e.g. "
                             "runs/joint/step_0/metrics.json of configs/shapes_joint.yaml; "
                             "{seed} in the path stands for each seed")
    parser.add_argument("--seeds", help="comma-separated training seeds for the accuracy "
                        "sections (2step, 4step, 6step), e.g. 0,1: each variant runs per seed "
                        "(step 0 too) and the tables give the mean and min-max "
                        "(default: the config's train.seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every section")
    add_device(parser, "where the sections train (throughput included); sets train.device of "
               "every section's config (cost, herding and inference measure the CPU, gpu CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--markdown", action="store_true",
                        help="print the figures table of WORK_DIR/benchmark.json and exit")
    args = parser.parse_args(argv)
    setup_logging()
    args.work_dir = args.work_dir or (
        "runs/benchmark_quick" if args.quick else "runs/benchmark") + (
        "" if args.regime == "scratch" else f"_{args.regime}")
    if args.markdown:
        with open(f"{args.work_dir}/benchmark.json") as f:
            print(markdown(json.load(f)))
        return 0

    sections = [s for s in args.sections.split(",") if s]
    for section in sections:
        if section not in SECTIONS:
            parser.error(f"--sections: unknown section {section!r}; choose from "
                         f"{', '.join(SECTIONS)}")

    def preset(name: str) -> str:
        """The config file of preset NAME in the chosen regime."""
        path = Path(REGIMES[args.regime]) / f"{name}.yaml"
        if not path.is_file():
            parser.error(f"--regime {args.regime}: {path} does not exist (the regime has no "
                         f"preset {name}; presets there: "
                         f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))})")
        return str(path)

    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds else [None]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected integers such as 0,1")
    methods = []  # "NAME@key=value@...": the variant NAME with extra overrides of its own
    for entry in (m for m in args.methods.split(",") if m):
        name, *extra = entry.split("@")
        if name in RENAMED_METHODS:
            deprecated(f"--methods {name}", f"--methods {RENAMED_METHODS[name]}")
            entry = "@".join([RENAMED_METHODS[name], *extra])
        if entry in methods:
            parser.error(f"--methods: {entry} is named twice")
        methods.append(entry)
    try:
        method_variants([m.split("@")[0] for m in methods])
    except UserError as e:
        parser.error(str(e))
    if args.iters_per_class is not None and args.iters_per_class < 1:
        parser.error(f"--iters-per-class {args.iters_per_class}: expected a positive integer")
    if args.joint_reference and any(m.split("@")[0] == "joint" for m in methods):
        parser.error("--joint-reference replaces training joint: drop joint from --methods, or "
                     "drop --joint-reference to train it")

    def total_iterations(cfg: dict) -> int:
        """The incremental run's steps together: the equal-compute joint's budget."""
        classes = load_experiment(cfg, progress=False)[2]
        return incremental_iterations(cfg, classes, [], classes.num_steps - 1)

    if args.regime != "scratch" and not (args.iters or args.iters_per_class or args.quick):
        # the regime's presets give their budget per class: measure at it
        args.iters_per_class = load_config(preset("shapes_2step"))["train"]["iters_per_class"]
    iters = args.iters or (20 if args.quick else 600)
    # the accuracy sections' budget: per step, or per class a step adds
    if args.iters_per_class:
        budget, budget_name = [f"train.iters_per_class={args.iters_per_class}"], \
            f"{args.iters_per_class}pc"
    else:
        budget, budget_name = [f"train.max_iters={iters}", "train.iters_per_class=null"], iters
    if args.quick:  # evaluate on 100 validation images: the quick figures are a smoke check
        args.overrides = ["data.val_max_images=100"] + args.overrides
    args.overrides = args.overrides + device_overrides(args.device)
    progress = not args.no_progress
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "date": time.strftime("%Y-%m-%d %H:%M"), "iters_per_step": iters,
              "regime": args.regime,
              "overrides": args.overrides, "results": {}}
    out_path = f"{args.work_dir}/benchmark.json"

    def earlier_results() -> dict:
        """The sections in OUT/benchmark.json now (other runs may write other sections)."""
        try:
            with open(out_path) as f:
                return json.load(f).get("results", {})
        except (OSError, ValueError):
            return {}

    written = False
    for section in sections:
        if section == "throughput":
            cfg = load_config(preset("shapes_joint"), args.overrides)
            r = training_cost.training_throughput(cfg, iters=10 if args.quick else 30,
                                                  device=args.device or "cpu")
            print(f"[throughput] step-0 training: {r['images_per_second']:.1f} images/s "
                  f"(batch {r['batch_size']}, {r['threads']} threads)")
        elif section == "cost":
            cfg = load_config(preset("shapes_2step"), args.overrides)
            r = training_cost.iteration_cost(cfg, iters=5 if args.quick else 15)
            print(f"[cost] iteration with teacher / without: {r['ratio']:.2f}x "
                  f"({r['incdet_s']:.3f}s vs {r['plain_s']:.3f}s, batch {r['batch_size']})")
        elif section == "herding":
            n = 1000 if args.quick else 4000
            r = herding.herding_time([n, 2 * n, 4 * n])
            print("[herding] " + ", ".join(f"{k} images ({v['pairs']} image-class pairs): "
                                           f"{v['seconds']:.2f}s" for k, v in r.items()))
            r["ratio_4n_to_n"] = r[4 * n]["seconds"] / r[n]["seconds"]
        elif section == "scale":  # COCO-size bookkeeping and memory.candidates_per_class
            r = scale.section(args.work_dir, load_config(preset("shapes_2step"), args.overrides),
                              iters, repeats=1 if args.quick else 2, progress=progress)
            print("\n".join(scale.summary(r)))
        elif section == "inference":

            two = Path(args.work_dir) / f"shapes_2step_{iters}"
            ckpt = two / "incdet_no_memory" / "step_1" / "checkpoint.pt"
            if not ckpt.is_file():  # train the 2-step model (the 2step section reuses it)
                cfg = load_config(preset("shapes_2step"),
                                  args.overrides + [f"train.max_iters={iters}"])
                run_protocol(cfg, two, method_variants(["incdet_no_memory"]), progress)
            r = inference.inference_speed(ckpt, num_images=32 if args.quick else 100,
                                          export_dir=Path(args.work_dir) / "export")
            ips = r["images_per_second"]
            print("[inference] images/s, one image per call: " + ", ".join(
                f"{k} {v:.1f}" for k, v in ips.items()))
            print(f"[inference] grown / plain torchvision: {r['grown_over_plain']:.3f}, "
                  f"fused / plain: {r['fused_over_plain']:.3f}")
        elif section == "gpu":
            if not torch.cuda.is_available():
                print("[gpu] skipped: no CUDA device here (torch.cuda.is_available() is False); "
                      "run --sections gpu on a machine with a GPU")
                continue
            r = {}
            # the CPU preset and the COCO preset's model (R50-FPN, 800 px) on the built-in data
            gpu = ["train.device=cuda", "train.channels_last=true", "train.num_workers=auto"]
            cpu_cfg = load_config(preset("shapes_2step"), args.overrides + gpu)
            coco_cfg = load_config(preset("shapes_2step"), args.overrides + gpu)
            coco = load_config("configs/_coco_base.yaml")
            coco_cfg["model"] = dict(coco["model"], weights=None)
            coco_cfg["loss"]["box"] = coco["loss"]["box"]
            n = 3 if args.quick else 10
            for name, cfg in (("cpu_preset", cpu_cfg), ("coco_preset", coco_cfg)):
                r[name] = model_cost.model_cost(cfg, "cuda", iters=n, batch_size=16)
                for amp in ("null", "bf16"):
                    tcfg = load_config(preset("shapes_2step"),
                                       args.overrides + gpu + [f"train.amp={amp}"])
                    tcfg["model"], tcfg["loss"] = cfg["model"], cfg["loss"]
                    r[name][f"training_images_per_second_{amp}"] = \
                        training_cost.training_throughput(tcfg, iters=10 if args.quick else 50,
                                                          device="cuda")["images_per_second"]
                for p, sp in r[name]["speedup_over_tv_v2"].items():
                    print(f"[gpu] {name} {p}: speed-up over torchvision v2 (model only, batch "
                          f"16): " + ", ".join(f"{k} {v:.2f}" for k, v in sp.items()))
                ips = {a: r[name][f"training_images_per_second_{a}"] for a in ("null", "bf16")}
                print(f"[gpu] {name}: training loop {ips['null']:.0f} images/s fp32, "
                      f"{ips['bf16']:.0f} bf16; peak {r[name]['peak_gpu_memory_gib']:.1f} GiB")
        elif section == "pretrained":
            cfg = load_config(preset("shapes_2step"),
                              args.overrides + [f"train.max_iters={iters}"])
            r = pretrained.pretrained(cfg, f"{args.work_dir}/pretrained_{iters}", PRETRAINED,
                                      progress, cost_iters=3 if args.quick else 10)
            print(f"[pretrained] step-0 AP trained {r['trained_step0_ap']:.4f}, imported "
                  f"{r['imported_ap']:.4f}")
            for m, v in r["variants"].items():
                print(f"[pretrained] {m}: old {v['old']:.3f} new {v['new']:.3f} all "
                      f"{v['all']:.3f}, old kept {v['old_retention']:.3f}")
            c = r["cost"]
            print(f"[pretrained] iteration branch / incdet: {c['branch_over_incdet']:.2f} "
                  f"({c['branch_s']:.3f}s vs {c['incdet_s']:.3f}s, batch {c['batch_size']})")
        elif section == "merge":
            cfg = load_config(preset("shapes_2step"), args.overrides + budget)
            r = merge_benchmark(cfg, f"{args.work_dir}/merge_{budget_name}", progress)
            c, k = r["consolidation"], r["compression"]
            print(f"[merge] consolidation: branch AP {c['branch_ap']:.3f}, merged "
                  f"{c['merged_ap']:.3f} ({c['ratio']:.3f} x), images/s "
                  f"{c['branch_images_per_second']:.1f} -> {c['merged_images_per_second']:.1f}")
            for name, m in r["merge_two"].items():
                print(f"[merge] A + B ({name}): A {m['a_over_teacher_a']:.3f} x teacher A, B "
                      f"{m['b_over_teacher_b']:.3f} x teacher B, all {m['all_ap']:.3f} "
                      f"(incdet without memory {r['incdet_without_memory_ap']:.3f})")
            print(f"[merge] compression: student {k['distilled_ap']:.3f} = "
                  f"{k['distilled_over_labels_only']:.3f} x labels alone, "
                  f"{k['distilled_over_teacher']:.3f} x teacher, {k['speedup']:.2f} x images/s")
            for kind in ("fpn", "backbone"):
                f = r[f"branch_from_{kind}"]
                print(f"[merge] branch_from {kind}: new-class AP {f['new_ap']:.3f} = "
                      f"{f['new_over_incdet']:.3f} x incdet's (tower "
                      f"{f['tower_new_over_incdet']:.3f} x), old {f['old_ap']:.3f} (step 0 "
                      f"{f['step0_ap']:.3f}), images/s {f['images_per_second']:.1f} (tower "
                      f"{f['tower_images_per_second']:.1f})")
            b = r["consolidation_backbone"]
            print(f"[merge] branch_from backbone consolidated: {b['merged_ap']:.3f} = "
                  f"{b['ratio']:.3f} x its branch model, {b['all_over_incdet_without_memory']:.3f}"
                  f" x incdet without memory")
        else:
            name = PROTOCOLS[section]
            variants = {}
            for entry in methods:
                m, *extra = entry.split("@")
                variants[entry] = method_variants([m])[m] + (
                    ["memory.budget=0"] if m in NO_MEMORY else [])
                if m == "joint":  # evaluated at half its budget too: how converged it is
                    half = total_iterations(load_config(preset(name),
                                                        args.overrides + budget)) // 2
                    variants[entry] += [f"eval.every_iters={half}",
                                        f"train.checkpoint_every={half}"]
                variants[entry] += extra
            per_seed = {}
            for seed in seeds:
                cfg = load_config(preset(name), args.overrides + budget + (
                    [] if seed is None else [f"train.seed={seed}"]))
                seed = cfg["train"]["seed"]
                joint_ap = reference = None
                if "joint" not in variants and args.joint_reference:  # checked before training
                    reference = args.joint_reference.replace("{seed}", str(seed))
                    _, _, classes = load_experiment(cfg, progress=False)
                    joint_ap = accuracy.read_joint_reference(
                        reference, cfg, list(classes.order), iterations=total_iterations(cfg))
                # seed 0 keeps the folder of the runs made before --seeds existed
                folder = f"{args.work_dir}/{name}_{budget_name}" + (
                    f"_seed{seed}" if seed else "")
                r = accuracy.accuracy(cfg, folder, variants, progress)
                if joint_ap is not None:
                    r = accuracy.with_joint_reference(r, joint_ap, reference)
                per_seed[seed] = r
            r = accuracy.over_seeds(per_seed)
            r["variants"] = variants  # what each name ran (and: the names are run_protocol's)
            r["config"] = preset(name)
            r["protocol"] = "disjoint" if cfg["data"]["disjoint_steps"] else "standard"
            for key, label in (("final_ap", "final AP (all classes)"),
                               ("ratio_to_joint", "ratio to equal-compute joint"),
                               ("step0_retention", "step-0 classes kept (AP last / at step 0)")):
                if key in r:
                    print(f"[{section}] {label}: " + ", ".join(
                        f"{m}={accuracy.spread_text(v)}" for m, v in r[key].items()))
        protocol = section in PROTOCOLS or section == "merge"
        r["iters_per_step"] = (iters if section in ("inference", "pretrained") or
                               (protocol and args.iters_per_class is None) else None)
        r["iters_per_class"] = args.iters_per_class if protocol else None
        r["overrides"] = args.overrides
        r["regime"] = args.regime
        r["date"] = report["date"]
        # keep the sections that this run does not redo, as they are when it writes
        report["results"] = dict(earlier_results(), **{section: r})
        atomic_write_json(out_path, report)
        written = True
    if written:
        print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
