import sys

from fedsup.cli import main

sys.exit(main())
