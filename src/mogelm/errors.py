"""User-facing errors.

Raise `UserError` for mistakes a user can fix (bad flag, missing file, bad checkpoint). The CLI
prints its message on one line as `error: ...` and exits with status 2, with no traceback.
Internal bugs stay ordinary exceptions so their tracebacks reach us.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""
