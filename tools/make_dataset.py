"""The checkout's entry to incdet/tools/make_dataset.py (run it with --help).

Installed, the same tool is ``incdet-make-dataset`` or ``python -m incdet.tools.make_dataset``."""
from incdet.tools.cli import main_guard
from incdet.tools.make_dataset import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
