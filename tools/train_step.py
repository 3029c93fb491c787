"""The checkout's entry to incdet/tools/train_step.py (run it with --help).

Installed, the same tool is ``incdet-train-step`` or ``python -m incdet.tools.train_step``."""
from incdet.tools.cli import main_guard
from incdet.tools.train_step import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
