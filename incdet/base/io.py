"""Files: atomic writes, digests, and the image files a user names.

An atomic write writes to a temporary file in the same folder, fsyncs and renames: a reader never
sees a half-written file, and an interrupted write leaves the old file intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from incdet.base.errors import UserError

# what counts as an image in a folder, for every tool that reads one (infer, merge)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file ``tmp`` to ``path``, readable as a normal file
    (mkstemp's 0600 would hide it from other users)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic(path, lambda f: json.dump(obj, f, indent=2), "w")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def image_files(items: Iterable[str | os.PathLike], option: str = "--images") -> list[Path]:
    """The images ``items`` name: a file as it is, a folder as its files with a suffix of
    :data:`IMAGE_SUFFIXES` (any case), sorted by name. A missing path, or no image at all, is a
    :class:`UserError` naming ``option``."""
    items = [Path(item) for item in items]
    files: list[Path] = []
    for path in items:
        if path.is_dir():
            files += sorted(f for f in path.iterdir()
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{option} {path}: no such image file or folder")
    if not files:
        raise UserError(f"{option} {', '.join(map(str, items))}: no image found (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)})")
    return files
