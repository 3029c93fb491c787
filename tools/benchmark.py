"""The checkout's entry to incdet/tools/benchmark.py (run it with --help).

Installed, the same tool is ``python -m incdet.tools.benchmark``."""
from incdet.tools.benchmark import main
from incdet.tools.cli import main_guard

if __name__ == "__main__":
    raise SystemExit(main_guard(main))
