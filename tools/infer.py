"""The checkout's entry to incdet/tools/infer.py (run it with --help).

Installed, the same tool is ``incdet-infer`` or ``python -m incdet.tools.infer``."""
from incdet.tools.cli import main_guard
from incdet.tools.infer import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
