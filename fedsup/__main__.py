"""``python -m fedsup``: the same entry as the ``fedsup`` command. Importing ``fedsup`` is light (its names
load on first use), so a Ctrl-C while torch loads is caught in ``fedsup_cli.main``."""

import sys

from fedsup_cli import main

sys.exit(main())
