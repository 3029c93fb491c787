"""The checkout's entry to incdet/tools/hostcost.py (run it with --help).

Installed, the same tool is ``python -m incdet.tools.hostcost``."""
from incdet.tools.cli import main_guard
from incdet.tools.hostcost import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
