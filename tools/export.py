"""The checkout's entry to incdet/tools/export.py (run it with --help).

Installed, the same tool is ``incdet-export`` or ``python -m incdet.tools.export``."""
from incdet.tools.cli import main_guard
from incdet.tools.export import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
