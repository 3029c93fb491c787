"""The checkout's entry to incdet/tools/evaluate.py (run it with --help).

Installed, the same tool is ``incdet-evaluate`` or ``python -m incdet.tools.evaluate``."""
from incdet.tools.cli import main_guard
from incdet.tools.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
