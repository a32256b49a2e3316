"""The one base class of user-facing errors.

A `SimoneError` means the input or the environment is wrong, not the code: the CLI prints
its message as one line (which names the file and the problem) and exits with status 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""


class SimoneError(Exception):
    """A problem the user can fix; the message says which file and what to do."""
