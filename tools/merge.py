"""The checkout's entry to incdet/tools/merge.py (run it with --help).

Installed, the same tool is ``incdet-merge`` or ``python -m incdet.tools.merge``."""
from incdet.tools.cli import main_guard
from incdet.tools.merge import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
