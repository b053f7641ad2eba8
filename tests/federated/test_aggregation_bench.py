"""bench/aggregation.py at a tiny size, in a subprocess as a person runs it, so that the script cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "aggregation.py"


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def test_the_bench_measures_every_strategy_asked_and_cleans_up(tmp_path: Path) -> None:
    done = run_bench("--clients", "9", "--params", "2000", "--strategies", "fedavg,fedadam,bulyan",
                     "--scaling", "7,9", "--dir", str(tmp_path), "--json", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("torch-sum", "torch-sum-f64", "fedavg", "fedadam", "bulyan"):
        assert re.search(rf"^{name}\s.*\d+\.\d\d\s", out, re.M), (name, out)
    assert "multikrum" not in out and "fedmedian" not in out  # only the strategies asked for
    assert re.search(r"^\s+fedavg\s+wall within 2x the baseline .* (PASS|FAIL)$", out, re.M), out
    assert re.search(r"^\s+bulyan\s+peak at most 8 model-sizes .* (PASS|FAIL)$", out, re.M), out
    assert re.search(r"^krum\s+7\s", out, re.M) and re.search(r"^bulyan\s+9\s", out, re.M), out
    # The folder of updates is removed; only the JSON asked for remains, and it prints the same report.
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    again = run_bench("--from-json", str(tmp_path / "out.json"), timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split("targets")[1].strip() == out.split("targets")[1].split("\nbench took")[0].strip()


def test_bad_arguments_exit_2_with_one_line_naming_the_option(tmp_path: Path) -> None:
    for args, needle in [(("--strategies", "fedavg,nope"), "--strategies: unknown name(s) nope"),
                         (("--clients", "0"), "--clients: expected a whole number >= 1, got 0"),
                         (("--scaling", "3"), "--scaling: every size must be >= 7"),
                         (("--dir", str(tmp_path / "missing")), "is not a folder")]:
        done = run_bench(*args, timeout=120)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
