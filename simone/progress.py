"""How library functions report without printing: the command line passes the printers.

`say` takes one progress line; `show` takes a report (text or a rich renderable). Both default
to `quiet`, so a function called from a test or another program prints nothing.
"""

from collections.abc import Callable

Say = Callable[[str], None]
Show = Callable[[object], None]


def quiet(_: object) -> None:
    """The default `say`/`show`: report nothing."""
