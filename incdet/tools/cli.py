"""Shared command-line plumbing: logging set-up, the user-error guard (one line, exit 2) and the
options every tool spells the same way.

The tools speak one vocabulary (docs/design.md, "The command line"):

* ``--work-dir DIR``: an experiment folder, the ``step_<t>/`` folders a tool writes or reads and
  what it writes beside them (train_step, run_protocol, import_detector, merge, summarize; the
  benchmark's folder, which holds one experiment folder per section).
* ``--out-dir DIR``: a folder of other outputs (infer: detections.json and drawings;
  make_dataset: a dataset).
* ``--out FILE``: one output file (export: the model, with ``FILE.json`` beside it; evaluate: the
  evaluation as JSON).
* ``--device DEVICE``: where the tool computes, ``auto`` (CUDA when available, else CPU),
  ``cpu``, ``cuda`` or ``cuda:N``. The tools that train (train_step, run_protocol,
  import_detector, merge, benchmark) set ``train.device`` with it, after ``--set``; evaluate,
  infer and export compute there, never on the device saved in a checkpoint. hostcost measures
  the host side of a CPU iteration and has none.
* ``--config FILE``, ``--set KEY=VALUE`` (repeatable), ``--force``, ``--no-progress``; image
  inputs (``--images``) take the suffixes of :data:`incdet.base.io.IMAGE_SUFFIXES`; methods are
  named as :data:`incdet.experiment.protocol.VARIANTS` names them.

A former spelling keeps working for one release and prints a deprecation line on stderr
(:func:`add_renamed`, :func:`deprecated`): benchmark ``--out`` (now ``--work-dir``), infer and
make_dataset ``--out`` (now ``--out-dir``), evaluate ``--json`` (now ``--out``), summarize's
positional folder (now ``--work-dir``) and benchmark's method ``incdet_memory`` (now ``incdet``).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable

from incdet.base.devices import resolve_device
from incdet.base.errors import UserError

_PREFIX = "incdet.base.errors.UserError: "
DEVICES = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s")


def user_message(err: UserError) -> str:
    """The one-line message of a UserError, also when it was re-raised by a DataLoader worker
    (which prepends the worker's traceback to the message)."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    return last[len(_PREFIX):] if last.startswith(_PREFIX) else last


def main_guard(main: Callable[[], int]) -> int:
    try:
        return main()
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def deprecated(old: str, new: str) -> None:
    """The deprecation line of a former spelling, on stderr."""
    print(f"warning: {old} is deprecated and will be removed in the next release; use {new}",
          file=sys.stderr)


class _Renamed(argparse.Action):
    """Stores the value, as argparse's default action does; given by its last option string
    (the former spelling), it also prints the deprecation line."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.option_strings[-1]:
            deprecated(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, name: str, old: str,
                **kwargs) -> argparse.Action:
    """``parser.add_argument(name, old, **kwargs)`` where ``old`` is the option's former
    spelling: it still works, for one release, with a deprecation line on stderr."""
    kwargs["help"] = f"{kwargs['help']}; {old} is its former spelling, deprecated"
    return parser.add_argument(name, old, action=_Renamed, **kwargs)


def device_name(value: str) -> str:
    """The ``type`` of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {DEVICES}")


def add_device(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--device``: ``what`` the tool computes there, the choices and the default (None: the
    config's ``train.device``)."""
    shown = default or "the config's train.device"
    parser.add_argument("--device", type=device_name, default=default, metavar="DEVICE",
                        help=f"{what}: {DEVICES} (default: {shown})")


def device_overrides(device: str | None) -> list[str]:
    """The ``--set`` of a training tool's ``--device`` (none without one): ``train.device``;
    CUDA asked for where there is none is an error naming ``--device``."""
    if device is None:
        return []
    resolve_device(device, "--device")
    return [f"train.device={device}"]
