"""The checkout's entry to incdet/tools/summarize.py (run it with --help).

Installed, the same tool is ``incdet-summarize`` or ``python -m incdet.tools.summarize``."""
from incdet.tools.cli import main_guard
from incdet.tools.summarize import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
