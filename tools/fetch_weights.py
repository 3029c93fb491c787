"""The checkout's entry to incdet/tools/fetch_weights.py (run it with --help).

Installed, the same tool is ``incdet-fetch-weights`` or ``python -m incdet.tools.fetch_weights``."""
from incdet.tools.cli import main_guard
from incdet.tools.fetch_weights import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
