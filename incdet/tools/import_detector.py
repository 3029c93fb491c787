"""Import a trained torchvision RetinaNet as step 0 of an experiment, to add classes to it.

    python tools/import_detector.py --weights RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1 \
        --work-dir runs/coco_plus
    python tools/import_detector.py --state-dict model.pt --arch retinanet_resnet50_fpn \
        --classes classes.json --config my.yaml --work-dir runs/mine

Writes WORK_DIR/step_0/ (checkpoint.pt, config.yaml, metrics.json) as if incdet had trained it;
with --config, the detector is evaluated on that config's validation set. Then train the new
classes with a config whose `_base_` is WORK_DIR/step_0/config.yaml (see the README).
"""
from __future__ import annotations

import argparse

from incdet.base.config import load_config
from incdet.experiment import importer
from incdet.model.torchvision import ARCHS, INCDET_ARCH
from incdet.tools.cli import add_device, device_overrides, main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="torchvision weights name, read from the local torch "
                        "cache (never downloaded), e.g. RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")
    source.add_argument("--state-dict", help="file saved with torch.save(model.state_dict(), "
                        "path) from a torchvision RetinaNet")
    parser.add_argument("--arch", choices=sorted(ARCHS) + [INCDET_ARCH],
                        help="the detector's layout (with --state-dict); the _v2 layouts have a "
                             "GroupNorm head and P6 from C5, as torchvision's _v2 builder; "
                             "incdet: the layout --config's model settings describe (a state "
                             "dict from tools/export.py --format state_dict)")
    parser.add_argument("--classes", help="JSON: a list of {id, name}, one per output slot "
                        "('__background__' / 'N/A' for slots that are no class), the OUT.json "
                        "that tools/export.py writes, or a COCO annotation file (slot = "
                        "category id, torchvision's convention)")
    parser.add_argument("--work-dir", required=True, help="experiment folder (step_0/ is written)")
    parser.add_argument("--config", help="YAML config of the experiment: data and training "
                        "settings (the model settings come from the detector); its validation "
                        "set evaluates the imported detector")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, also the model "
                        "settings a state dict does not carry (model.min_size, model.max_size, "
                        "model.score_thresh, ...: torchvision's defaults otherwise)")
    parser.add_argument("--force", action="store_true", help="replace an existing step 0")
    add_device(parser, "where the imported detector is evaluated (with --config); sets "
               "train.device, saved in its config.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.state_dict and (args.arch is None or args.classes is None):
        parser.error("--state-dict needs --arch and --classes")
    setup_logging()

    cfg = load_config(args.config, args.overrides + device_overrides(args.device))
    model, slots, source = importer.detector_and_slots(
        args.weights or args.state_dict, None if args.weights else args.arch, args.classes,
        cfg["model"])
    metrics = importer.import_detector(model, slots, cfg, args.work_dir, source,
                                       evaluate=args.config is not None, force=args.force,
                                       progress=not args.no_progress, overrides=args.overrides)
    ap = metrics["map"]["all"]["AP"]
    print(f"imported {len(metrics['classes']['new'])} classes from {source} into "
          f"{args.work_dir}/step_0" + ("" if ap is None else f" (AP {ap:.3f})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
