import sys

from fedsup.ui.cli import main

sys.exit(main())
