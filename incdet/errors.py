"""The one exception type for mistakes a user can make (bad paths, bad JSON, bad split, ...).

Command-line tools catch :class:`UserError`, print its message on one line and exit with code 2;
any other exception is a bug in incdet and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message names the file or key and the fix."""
