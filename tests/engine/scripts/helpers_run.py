"""Run a supervisor whose one task leaves a helper and a setsid() daemon running and then blocks, for a test
that SIGKILLs this process (the supervisor) and checks that nothing of the run outlives it.

    python helpers_run.py FOLDER FIFO

The task announces ``"<task_id> <pid> <helper> <daemon>"`` on FIFO once its helpers run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `toys`

import toys  # noqa: E402

import fedsup  # noqa: E402


def main() -> int:
    folder, fifo = sys.argv[1], sys.argv[2]
    fedsup.Supervisor("cpu", max_retries=0).run([toys.Daemons("blocks", folder, then="block", fifo=fifo)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
