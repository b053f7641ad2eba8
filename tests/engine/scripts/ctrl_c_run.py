"""Run a supervisor that a test stops with SIGINT or SIGTERM, as a user would with Ctrl-C or `kill`.

    python ctrl_c_run.py RUN_DIR FIFO GRACE_PERIOD

The tasks, on a described inventory (two 16 GiB GPUs; nothing touches CUDA), are laid out so that the
state at the moment the two announcements have come is known:

* ``quick`` (pinned to the CPU) finishes at once;
* ``gpu0-a`` and ``gpu0-b`` (10 GiB each, pinned to cuda:0, where only one fits): one trains and announces
  itself on FIFO, the other is loaded and WAITING for the device;
* ``gpu1`` (pinned to cuda:1) is only admitted once ``quick``'s process has gone (``max_loaded=3``), so
  its announcement also means ``quick`` has finished;
* ``queued`` never gets a process (``max_loaded=3``).

On RunInterrupted it prints one JSON line (the records) and exits 128 + the signal number; if the run
ends on its own it prints the records and exits 0, which the test treats as a failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for `toys`

import toys  # noqa: E402

import fedsup  # noqa: E402


def main() -> int:
    run_dir, fifo, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tasks = [
        toys.Ok("quick", device="cpu"),
        toys.Blocker("gpu0-a", fifo, device="cuda:0", estimate_cuda_memory="10GiB"),
        toys.Blocker("gpu0-b", fifo, device="cuda:0", estimate_cuda_memory="10GiB"),
        toys.Blocker("gpu1", fifo, device="cuda:1", estimate_cuda_memory="10GiB"),
        toys.Blocker("queued", fifo, device="cuda:1", estimate_cuda_memory="10GiB"),
    ]
    supervisor = fedsup.Supervisor(
        devices=[{"name": "cuda:0", "memory": "16GiB"}, {"name": "cuda:1", "memory": "16GiB"}],
        cpus=4, max_loaded=3, run_dir=run_dir, grace_period=grace, max_retries=0,
        tasks_per_process=1,  # the test counts one process per task: "quick"'s must not be handed on
    )
    try:
        records = supervisor.run(tasks)
    except fedsup.RunInterrupted as exc:
        print(json.dumps({"signum": exc.signum, "records": [r.model_dump(mode="json") for r in exc.records]}))
        sys.stdout.flush()
        return 128 + exc.signum
    print(json.dumps({"signum": None, "records": [r.model_dump(mode="json") for r in records]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
