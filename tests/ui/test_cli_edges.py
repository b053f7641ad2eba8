"""The command line at its edges, through real processes: Ctrl-C at import time, output into a closed pipe,
and the file system refusing (read-only, full, a symlink loop, a missing folder), each one line and a
distinct exit status; a run whose disk filled up mid-way resumes to the same model as an undisturbed one.

The file-system cases mount small tmpfs file systems (root ignores file modes, not a read-only mount); where
mounting is not permitted they are skipped, and every mount is undone even when a test fails.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are
SCRIPT = str(Path(sys.executable).parent / "fedsup")  # the console script, as a person runs it
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")

# Imported first thing by the interpreter (from PYTHONPATH): sends this process SIGINT when the module named
# in SIGINT_AT_IMPORT is about to be imported, so the Ctrl-C lands inside that import, every time.
SIGINT_SHIM = '''
import os, signal, sys
_target = os.environ.get("SIGINT_AT_IMPORT")
if _target:
    class _Trigger:
        def find_spec(self, name, path=None, target=None):
            if name == _target:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None
    sys.meta_path.insert(0, _Trigger())
'''

# Client 0 fills the disk while evaluating round ``fill_round`` (once: the marker lives off that disk), so
# the next thing the supervisor writes fails with ENOSPC.
FILLING_TOYS = '''
import errno
from pathlib import Path
from fed_toys import QuadraticClient

class FillingClient(QuadraticClient):
    def __init__(self, client_id, filler="", marker="", fill_round=0, **kwargs):
        super().__init__(client_id, **kwargs)
        self.filler, self.marker, self.fill_round = filler, marker, fill_round

    def evaluate(self, device):
        if self.filler and self.round == self.fill_round and self.client_id == 0 and not Path(self.marker).exists():
            Path(self.marker).touch()
            with open(self.filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(65536))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        return {"num_examples": 1, "distance": float(self.global_state["w"].norm())}
'''


def env(*paths: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([*map(str, paths), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def fedsup(*args: str, environ: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=environ or env(), timeout=timeout)


def config(tmp_path: Path, output: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {"name": "edges", "seed": 0, "task": {"class": "fed_toys:KnownClient"},
                            "federation": {"clients": 3, "rounds": 1},
                            "supervisor": {"devices": "cpu", "max_retries": 0}, "output": str(output), **changes}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def not_logged(stderr: str) -> list[str]:
    """stderr without the log lines of a run's progress: what the person is told about the ending."""
    return [line for line in stderr.splitlines() if not LOG_LINE.match(line)]


# -- Ctrl-C at any moment


@pytest.mark.timeout(180)
@pytest.mark.parametrize("module", ["fedsup", "torch", "fedsup.federated.runner", "fedsup.engine.supervisor"])
def test_ctrl_c_while_importing_is_one_line_and_130(tmp_path: Path, module: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(SIGINT_SHIM)
    path = config(tmp_path, tmp_path / "run")
    done = fedsup("run", str(path), environ=env(tmp_path, SIGINT_AT_IMPORT=module))
    assert done.returncode == 130, done.stderr
    assert done.stderr == "fedsup: interrupted\n"
    assert not (tmp_path / "run" / "events.jsonl").exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("module", ["torch", "fedsup.federated.runner"])
def test_ctrl_c_while_importing_through_python_m(tmp_path: Path, module: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(SIGINT_SHIM)
    path = config(tmp_path, tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "fedsup", "run", str(path)], capture_output=True, text=True,
                          env=env(tmp_path, SIGINT_AT_IMPORT=module), timeout=180)
    assert (done.returncode, done.stderr) == (130, "fedsup: interrupted\n")


# -- a closed pipe


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", [["status", "--json"], ["status"], ["devices", "--json"]])
def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path, command: list[str]) -> None:
    sys.path.insert(0, str(TESTS / "ui"))
    try:
        from report_fixtures.synthetic_runs import write_large_run
    finally:
        sys.path.remove(str(TESTS / "ui"))
    run = write_large_run(tmp_path / "run", tasks=2000)
    args = [*command[:1], str(run), *command[1:]] if command[0] == "status" else command
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before a byte is written: every write meets EPIPE
    try:
        done = subprocess.run([SCRIPT, *args], stdout=writer, stderr=subprocess.PIPE, text=True, env=env(),
                              timeout=180)
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell shows for a command its pipe's reader left


# -- the file system refuses


@contextmanager
def mounted(target: Path, options: str, source: str = "tmpfs", kind: str | None = "tmpfs") -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    command = ["mount", *(["-t", kind] if kind else []), "-o", options, source, str(target)]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)  # busy: detach it


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    try:
        with mounted(probe, "size=64k"):
            pass
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}): needs root and mounting permitted")


def assert_one_line(done: subprocess.CompletedProcess[str], status: int, *parts: str) -> None:
    assert done.returncode == status, done.stderr
    lines = not_logged(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("fedsup: error: "), done.stderr
    for part in parts:
        assert part in lines[0], done.stderr


@pytest.mark.timeout(120)
def test_a_read_only_output_folder_is_one_line_and_2(tmp_path: Path, can_mount: None) -> None:
    with mounted(tmp_path / "ro", "size=1m,ro") as folder:
        done = fedsup("run", str(config(tmp_path, folder / "run")))
    assert_one_line(done, 2, str(folder / "run"), "Read-only file system (EROFS)")


@pytest.mark.timeout(240)
def test_resume_in_a_read_only_run_directory_is_one_line_and_2(tmp_path: Path, can_mount: None) -> None:
    source = tmp_path / "run"
    path = config(tmp_path, source, federation={"clients": 3, "rounds": 2})
    assert fedsup("run", str(path), "--set", "federation.rounds=1").returncode == 0
    view = tmp_path / "view"
    with mounted(view, "bind", source=str(source), kind=None):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True, timeout=30)
        done = fedsup("run", str(path), "--output", str(view), "--resume", "--set", "federation.rounds=1")
    assert_one_line(done, 2, str(view), "Read-only file system (EROFS)")


@pytest.mark.timeout(120)
def test_a_full_disk_before_the_run_is_one_line_and_2(tmp_path: Path, can_mount: None) -> None:
    with mounted(tmp_path / "full", "size=64k") as folder:
        with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as info:
            while True:
                f.write(bytes(4096))
        assert info.value.errno == errno.ENOSPC
        done = fedsup("run", str(config(tmp_path, folder / "run")))
    assert_one_line(done, 2, str(folder / "run"), "No space left on device (ENOSPC)")


@pytest.mark.timeout(120)
def test_a_symlink_loop_as_output_is_one_line_and_2(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for output in (tmp_path / "a", tmp_path / "a" / "run"):
        done = fedsup("run", str(config(tmp_path, output)))
        assert_one_line(done, 2, str(tmp_path / "a"), "Too many levels of symbolic links (ELOOP)")


@pytest.mark.timeout(120)
def test_an_output_under_a_file_and_a_config_in_a_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder\n")
    done = fedsup("run", str(config(tmp_path, tmp_path / "plain" / "run")))
    assert_one_line(done, 2, str(tmp_path / "plain"), "Not a directory (ENOTDIR)")
    done = fedsup("--traceback", "run", str(config(tmp_path, tmp_path / "plain" / "run")))
    assert done.returncode == 1 and "Traceback" in done.stderr and "NotADirectoryError" in done.stderr
    missing = tmp_path / "nowhere" / "run.yaml"
    done = fedsup("validate", str(missing))
    assert done.returncode == 2 and f"{missing}: no such config file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(480)
def test_a_disk_filling_up_mid_run_fails_in_one_line_and_resume_is_exact(tmp_path: Path, can_mount: None) -> None:
    (tmp_path / "toys").mkdir()
    (tmp_path / "toys" / "filling_toys.py").write_text(FILLING_TOYS)
    environ = env(tmp_path / "toys")
    rounds = {"clients": 3, "rounds": 4}
    undisturbed = tmp_path / "undisturbed"
    done = fedsup("run", str(config(tmp_path, undisturbed, federation=rounds,
                                    task={"class": "filling_toys:FillingClient"})), environ=environ)
    assert done.returncode == 0, done.stderr
    with mounted(tmp_path / "disk", "size=4m") as disk:
        task = {"class": "filling_toys:FillingClient", "args": {
            "filler": str(disk / "filler"), "marker": str(tmp_path / "filled"), "fill_round": 2}}
        path = config(tmp_path, disk / "run", federation=rounds, task=task)
        done = fedsup("run", str(path), environ=environ)
        assert_one_line(done, 1, str(disk / "run"), "No space left on device (ENOSPC)")
        assert (tmp_path / "filled").exists(), "the disk was never filled: the test did not test"
        (disk / "filler").unlink()
        resumed = fedsup("run", str(path), "--resume", environ=environ)
        assert resumed.returncode == 0, resumed.stderr
        final = torch.load(disk / "run" / "checkpoints" / "final.pt", weights_only=True)
    expected = torch.load(undisturbed / "checkpoints" / "final.pt", weights_only=True)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
