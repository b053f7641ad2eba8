"""A script that starts a run at import, when fedsup has to start processes with spawn (which imports the
script again in each): one error naming the script and the fix, not a fork server dying again and again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedsup.engine.rundir import lock_state

SCRIPT = '''
import threading
import fedsup
{thread}
def main():
    summary = fedsup.run({{"name": "g", "seed": 1, "output": {output!r},
        "task": {{"class": "fedsup.examples.synthetic:SyntheticClient",
                 "args": {{"samples": 40, "test_samples": 20}}}},
        "federation": {{"clients": 3, "rounds": 1}},
        "supervisor": {{"devices": "cpu", "start_method": {method!r}}}}})
    print("status", summary["status"])
{call}
'''

# A library's background thread: a process with other threads must not fork, so the fork server is spawned.
THREAD = "threading.Thread(target=threading.Event().wait, daemon=True).start()"


def run_script(tmp_path: Path, method: str, guarded: bool) -> subprocess.CompletedProcess[str]:
    call = "if __name__ == '__main__':\n    main()" if guarded else "main()"
    script = tmp_path / "experiment.py"
    script.write_text(SCRIPT.format(thread=THREAD if method == "forkserver" else "", output=str(tmp_path / "run"),
                                    method=method, call=call))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("method", "what"), [("forkserver", "fedsup's fork server (spawn, because 1 other Python "
                                                             "thread(s) are running)"),
                                              ("spawn", "a task process (supervisor start_method: spawn)")])
def test_a_script_that_runs_at_import_gets_one_error_naming_it(tmp_path: Path, method: str, what: str) -> None:
    done = run_script(tmp_path, method, guarded=False)
    assert done.returncode == 1, done.stderr
    script = tmp_path / "experiment.py"
    message = (f"MainModuleReentry: {script} starts a fedsup run when it is imported, and {what} imports it "
               "again, as spawn does in every process it starts: the run would start over in there. Put the code "
               'that starts the run under `if __name__ == "__main__":`')
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "infrastructure death" not in done.stderr and "in use by another run" not in done.stderr
    assert done.stderr.count("Traceback") == 1  # the script's own uncaught error, nothing from fedsup's processes
    assert not lock_state(tmp_path / "run").held
    left = []  # the spawned processes started in tmp_path (fork servers) or in its run's task folders
    for proc in psutil.process_iter(["cwd"]):
        if (proc.info["cwd"] or "").startswith(str(tmp_path)):
            left.append(proc)
            proc.kill()
    assert not left, left


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_same_script_with_the_guard_runs(tmp_path: Path, method: str) -> None:
    done = run_script(tmp_path, method, guarded=True)
    assert done.returncode == 0 and "status finished" in done.stdout, done.stderr[-3000:]
