"""The checkout's entry to incdet/tools/import_detector.py (run it with --help).

Installed, the same tool is ``incdet-import-detector`` or
``python -m incdet.tools.import_detector``."""
from incdet.tools.cli import main_guard
from incdet.tools.import_detector import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
