"""User-facing errors.

Raise `UserError` for mistakes a user can fix (bad flag, missing file, bad checkpoint). The CLI
prints its message on one line as `error: ...` and exits with status 2, with no traceback.
Internal bugs stay ordinary exceptions so their tracebacks reach us.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


def run_for_user(fn, *args, **kwargs) -> int:
    """Call fn(*args, **kwargs) as a command's body: its status (0 for None); a UserError becomes
    one `error: ...` line on stderr and status 2, Ctrl-C `interrupted` and 130, no traceback."""
    import sys

    try:
        return int(fn(*args, **kwargs) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
