"""The checkout's entry to incdet/tools/run_protocol.py (run it with --help).

Installed, the same tool is ``incdet-run-protocol`` or ``python -m incdet.tools.run_protocol``."""
from incdet.tools.cli import main_guard
from incdet.tools.run_protocol import main

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
