"""Shared command-line plumbing: logging set-up and the user-error guard (one line, exit 2)."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from incdet.base.errors import UserError

_PREFIX = "incdet.base.errors.UserError: "


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s")


def user_message(err: UserError) -> str:
    """The one-line message of a UserError, also when it was re-raised by a DataLoader worker
    (which prepends the worker's traceback to the message)."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    return last[len(_PREFIX):] if last.startswith(_PREFIX) else last


def main_guard(main: Callable[[], int]) -> int:
    try:
        return main()
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
