"""The one exception type for mistakes a user can make (bad paths, bad JSON, bad split, ...).

Command-line tools catch :class:`UserError`, print its message on one line and exit with code 2;
any other exception is a bug in incdet and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message names the file or key and the fix."""


def check_choice(key: str, value, allowed) -> None:
    """A config value outside ``allowed`` is a :class:`UserError` naming the key and the choices."""
    if value not in allowed:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
