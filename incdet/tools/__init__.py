"""incdet's command-line tools, one module each, each with ``main(argv) -> exit code``.

Three ways to run one, all the same code: ``python tools/train_step.py`` in a checkout (the thin
scripts there), ``python -m incdet.tools.train_step`` and, once the package is installed
(``pip install .``), the console script ``incdet-train-step``. ``benchmark`` and ``hostcost``
measure the checkout's presets (``configs/``) and have no console script.
"""
from __future__ import annotations

import importlib
from typing import Callable

from incdet.tools.cli import main_guard

# the tools installed as console scripts ``incdet-<name with dashes>`` (setup.cfg lists them)
CONSOLE = ("train_step", "run_protocol", "evaluate", "infer", "export", "import_detector",
           "merge", "summarize", "make_dataset", "fetch_weights")


def _entry(name: str) -> Callable[[], int]:
    def run() -> int:
        return main_guard(importlib.import_module(f"incdet.tools.{name}").main)

    run.__name__ = name
    run.__doc__ = f"Console script: incdet.tools.{name}.main with the user-error guard."
    return run


train_step = _entry("train_step")
run_protocol = _entry("run_protocol")
evaluate = _entry("evaluate")
infer = _entry("infer")
export = _entry("export")
import_detector = _entry("import_detector")
merge = _entry("merge")
summarize = _entry("summarize")
make_dataset = _entry("make_dataset")
fetch_weights = _entry("fetch_weights")
