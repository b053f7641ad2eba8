"""The ``fedsup`` command's entry point. It lives outside the fedsup package on purpose.

A console script that names a module inside the package imports ``fedsup`` first, before any of fedsup's
code could catch a Ctrl-C. This module imports nothing: ``main`` imports the command line (and, with it,
torch, which takes seconds) inside its ``try``, so a Ctrl-C at any moment of start-up ends as one line and
exit status 130, like any other. ``python -m fedsup`` comes here too, through ``fedsup/__main__.py``.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130


def main() -> int:
    try:
        from fedsup.ui.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        if "--traceback" in sys.argv[1:]:
            raise
        try:
            print("fedsup: interrupted", file=sys.stderr)
        except OSError:  # stderr is a closed pipe: the exit status still says it
            pass
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
