"""Real CUDA work: run where an NVIDIA GPU is present, skipped elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedsup
from fedsup.engine.devices import DEFAULT_CONTEXT_MEMORY, DEFAULT_MARGIN, cpu_cores, describe_gpus

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not describe_gpus(), reason="no NVIDIA GPU visible through NVML")]

from gpu_toys import Allocate, ContextSize, OomOnce  # noqa: E402


@pytest.mark.timeout(180)
def test_real_cuda_task_is_pinned_and_measured(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="auto", run_dir=tmp_path).run([Allocate("a", 1.0, "2GiB")])
    record = records[0]
    assert record.status is fedsup.TaskStatus.FINISHED, record.error
    assert record.device == "cuda:0"
    assert record.result["visible"] == "0" and record.result["count"] == 1
    assert record.peak_gpu_memory is not None and record.peak_gpu_memory >= 1024**3
    assert not torch.cuda.is_initialized(), "the supervisor must never initialise CUDA"


@pytest.mark.timeout(180)
def test_real_cuda_oom_is_requeued_with_a_larger_estimate(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="auto", run_dir=tmp_path / "run").run([OomOnce("oom", str(tmp_path))])
    record = records[0]
    assert record.status is fedsup.TaskStatus.FINISHED, record.error
    assert record.attempts == 2
    assert record.history[0].status is fedsup.TaskStatus.INTERRUPT
    assert record.history[0].error.kind == "cuda_oom"
    assert record.estimate_cuda_memory > 1024**3


@pytest.mark.timeout(300)
def test_real_packing_by_estimate(tmp_path: Path) -> None:
    total = describe_gpus()[0]["total"]
    per_task = total // 3 - 1024**3  # three fit at once, a fourth does not
    gib = per_task / 1024**3
    tasks = [Allocate(f"p{i}", gib * 0.8, str(per_task), hold=1.0) for i in range(6)]
    records = fedsup.Supervisor(devices=[0], cpus=8, max_loaded=8, run_dir=tmp_path).run(tasks)
    assert all(r.status is fedsup.TaskStatus.FINISHED for r in records), [r.error for r in records]
    spans = [(r.train.started, r.train.started + r.train.duration) for r in records]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 2 <= most <= 3


@pytest.mark.timeout(180)
def test_cuda_context_size(tmp_path: Path, record_property: object) -> None:
    record = fedsup.Supervisor(devices="auto").run([ContextSize("ctx")])[0]
    assert record.status is fedsup.TaskStatus.FINISHED, record.error
    used, reserved = record.result["nvml_used"], record.result["torch_reserved"]
    print(f"\nCUDA context: NVML {used / 2**20:.0f} MiB for the process, torch reserved {reserved / 2**20:.0f} MiB")
    assert used is None or used > 0


@pytest.mark.timeout(180)
def test_enforced_estimate_too_small_runs_out_of_memory_then_finishes(tmp_path: Path) -> None:
    # 1 GiB held under a 256 MiB estimate: capped by enforce_memory, the first attempts run out of GPU memory
    # and are requeued with the estimate raised (256 -> 512 -> 768 -> 1152 MiB) until the task fits.
    task = Allocate("small-estimate", 1.0, "256MiB")
    record = fedsup.Supervisor(devices="auto", enforce_memory=True, max_interrupts=5).run([task])[0]
    assert record.status is fedsup.TaskStatus.FINISHED, record.error
    assert [a.status for a in record.history[:-1]] == [fedsup.TaskStatus.INTERRUPT] * (record.attempts - 1)
    assert record.attempts >= 2 and all(a.error.kind == "cuda_oom" for a in record.history[:-1])
    assert record.estimate_cuda_memory >= 1024**3


@pytest.mark.timeout(180)
def test_cuda_context_fits_the_default(tmp_path: Path) -> None:
    # What a task process holds beyond torch's reserved memory once cuBLAS and cuDNN have run: the ledger's
    # cuda_context_memory must cover it, within the margin, or packed tasks would overcommit the device.
    record = fedsup.Supervisor(devices="auto").run([ContextSize("ctx", libraries=True)])[0]
    assert record.status is fedsup.TaskStatus.FINISHED, record.error
    used, reserved = record.result["nvml_used"], record.result["torch_reserved"]
    if used is None:
        pytest.skip("NVML reports no per-process memory on this system")
    assert used - reserved <= DEFAULT_CONTEXT_MEMORY + DEFAULT_MARGIN, (used - reserved) / 2**20


@pytest.mark.timeout(240)
def test_enforced_oom_leaves_the_tasks_beside_it_untouched(tmp_path: Path) -> None:
    # Three tasks with honest estimates hold their memory while an under-estimated one, packed beside them,
    # runs out of its enforced share twice or more: only it is requeued; the others finish on their first try.
    honest = [Allocate(f"honest-{i}", 2.0, "3GiB", hold=3.0) for i in range(3)]
    greedy = Allocate("greedy", 1.0, "256MiB")
    records = fedsup.Supervisor(devices=[0], cpus=4, enforce_memory=True, max_interrupts=5).run([*honest, greedy])
    by_id = {r.task_id: r for r in records}
    assert all(r.status is fedsup.TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert by_id["greedy"].attempts >= 2
    assert all(a.error.kind == "cuda_oom" for a in by_id["greedy"].history[:-1])
    assert [by_id[t.task_id].attempts for t in honest] == [1, 1, 1]
    first_oom = by_id["greedy"].history[0].train
    assert first_oom is not None
    spans = [(r.train.started, r.train.started + r.train.duration) for r in (by_id[t.task_id] for t in honest)]
    oom_end = first_oom.started + first_oom.duration
    assert any(start < oom_end and first_oom.started < end for start, end in spans), "it ran beside the others"


@pytest.mark.timeout(240)
def test_every_task_process_can_use_cuda_whichever_fork_server_forked_it(tmp_path: Path) -> None:
    # The warm server's warm-up trains a model on the CPU; done as a plain backward pass and optimiser step, it
    # initialises the CUDA driver and leaves every child of the server unable to use CUDA. One process per
    # task, so that both servers fork some, and no retries, so that no failure hides behind one.
    tasks = [Allocate(f"t{i}", 0.1, "512MiB") for i in range(cpu_cores() + 4)]
    records = fedsup.Supervisor(devices=[0], max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is fedsup.TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 2, "tasks from both fork servers"


SUPERVISOR_ASKED_CUDA_FIRST = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
assert torch.cuda.is_available()  # through the CUDA runtime: a child forked from here could not use CUDA
import fedsup
from fedsup.engine import launch
from gpu_toys import Allocate
assert launch.cuda_initialised_here()
records = fedsup.Supervisor(devices=[0], max_retries=0).run([Allocate(f"a{i}", 0.1, "512MiB") for i in range(3)])
assert all(r.status.value == "FINISHED" for r in records), [r.error for r in records]
"""


@pytest.mark.timeout(240)
def test_a_supervisor_that_asked_cuda_first_still_runs_cuda_tasks(tmp_path: Path) -> None:
    # In its own interpreter: the question cannot be taken back, and this test process must stay able to fork.
    tests = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", SUPERVISOR_ASKED_CUDA_FIRST, tests], capture_output=True,
                          text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
