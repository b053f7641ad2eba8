"""scripts/env.sh's torch step, run for real against a fake interpreter whose pip records what it is asked
and fails where told: torch's CPU index first (with a short timeout), PyPI only as the fallback; nothing is
installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Stands in for .venv/bin/python: torch is not importable (unless TORCH_IMPORTABLE is set), and pip logs its
# arguments, failing where FAIL_WHEN is found in them (an index that cannot be reached).
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = "-c" ]; then [ -n "${TORCH_IMPORTABLE:-}" ]; exit $?; fi
echo "$*" >> "$PIP_LOG"
if [ -n "${FAIL_WHEN:-}" ] && [[ "$*" == *"$FAIL_WHEN"* ]]; then
    echo "ERROR: Could not find a version that satisfies the requirement torch==2.13.0" >&2
    exit 1
fi
exit 0
"""


def fake_project(tmp_path: Path, gpu: bool) -> tuple[Path, Path]:
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(PROJECT / "scripts" / "env.sh", root / "scripts" / "env.sh")
    (root / "pyproject.toml").write_text("")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    stamp = root / ".venv" / ".fedsup-installed"
    stamp.touch()
    os.utime(root / "pyproject.toml", (1, 1))  # older than the stamp: the project step is skipped
    tools = tmp_path / "bin"  # a PATH with the few tools env.sh uses, and nvidia-smi only where asked
    tools.mkdir()
    for tool in ("dirname", "cat", "env"):
        (tools / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (tools / "nvidia-smi").chmod(0o755)
    return root, tools


def source_env(tmp_path: Path, gpu: bool = False, after: str = "",
               **environ: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    root, tools = fake_project(tmp_path, gpu)
    log = tmp_path / "pip.log"
    done = subprocess.run([shutil.which("bash") or "/bin/bash", "-c", f'source "{root}/scripts/env.sh"{after}'],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tools), "PIP_LOG": str(log), "HOME": str(tmp_path), **environ})
    return done, log.read_text().splitlines() if log.exists() else []


def test_the_cpu_index_comes_first_with_a_short_timeout(tmp_path: Path) -> None:
    done, calls = source_env(tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls == [f"-m pip install -q --timeout 10 --retries 0 --index-url {CPU_INDEX} torch==2.13.0"]


def test_an_unreachable_cpu_index_falls_back_to_pypi(tmp_path: Path) -> None:
    done, calls = source_env(tmp_path, FAIL_WHEN="--index-url")
    assert done.returncode == 0, done.stderr
    assert calls == [f"-m pip install -q --timeout 10 --retries 0 --index-url {CPU_INDEX} torch==2.13.0",
                     "-m pip install -q torch==2.13.0"]
    assert f"could not install torch from {CPU_INDEX}; installing torch==2.13.0 from PyPI" in done.stderr


def test_a_gpu_machine_and_a_chosen_index(tmp_path: Path) -> None:
    done, calls = source_env(tmp_path / "gpu", gpu=True)
    assert done.returncode == 0 and calls == ["-m pip install -q torch==2.13.0"], done.stderr
    done, calls = source_env(tmp_path / "mirror", FEDSUP_TORCH_INDEX="https://mirror.example/whl")
    assert calls == ["-m pip install -q --timeout 10 --retries 0 --index-url https://mirror.example/whl "
                     "torch==2.13.0"]


def test_when_both_fail_sourcing_fails(tmp_path: Path) -> None:
    done, calls = source_env(tmp_path, FAIL_WHEN="torch==")
    assert done.returncode != 0
    assert len(calls) == 2 and calls[-1] == "-m pip install -q torch==2.13.0"


def test_sourcing_leaves_the_shell_s_own_options_and_a_failure_does_not_close_it(tmp_path: Path) -> None:
    done, _ = source_env(tmp_path / "ok", after='; echo "options $-"; false; echo "after false"')
    assert done.returncode == 0 and "after false" in done.stdout, done.stderr  # no errexit left behind
    assert "e" not in done.stdout.split("options ")[1].split()[0]
    done, _ = source_env(tmp_path / "failing", FAIL_WHEN="torch==", after='; echo "status $?"')
    assert "status 1" in done.stdout, (done.stdout, done.stderr)  # source failed; the shell went on
    assert "env.sh: setting up" in done.stderr
    # sourced as a condition (bash then ignores set -e in all it runs), as scripts/example does
    done, _ = source_env(tmp_path / "condition", FAIL_WHEN="torch==", after=' || echo "source failed"')
    assert "source failed" in done.stdout, (done.stdout, done.stderr)


def test_a_torch_already_installed_is_kept(tmp_path: Path) -> None:
    done, calls = source_env(tmp_path, TORCH_IMPORTABLE="1")
    assert done.returncode == 0 and calls == [], (calls, done.stderr)  # the machine's own build stays
