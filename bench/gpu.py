#!/usr/bin/env python
"""fedsup on one GPU: clients training a small CNN, packed by their memory estimates, against one at a time.

    python bench/gpu.py                         # 32 clients; exits 0 with a note where there is no NVIDIA GPU
    python bench/gpu.py --clients 64 --samples 8000 --json gpu.json

Every client trains a small CNN (two 3x3 convolutions, 32 and 64 channels, two linear layers) for one epoch
(batch 64, SGD lr 0.01) on CIFAR-shaped synthetic data: ``--samples`` images of 3x32x32 with 10 classes,
drawn from a generator seeded with the client's id, with cuDNN and cuBLAS held to deterministic kernels. Each
client returns its trained weights; their average (FedAvg, float64, by client id) is the variant's final
model, compared bit for bit across variants. First, the CUDA context of a task process is measured (NVML's
memory for the process less torch's reserved memory, after a first kernel, a cuBLAS matmul and a cuDNN
convolution). Then the variants, one after another on GPU 0:

* ``one-at-a-time``: fedsup with ``max_training=1``: one task process on the GPU at a time.
* ``packed``: fedsup with each client's ``estimate_cuda_memory`` taken from one probe client's measured peak
  (``peak_gpu_memory`` in its record, plus a quarter): as many train at once as the ledger fits (a CUDA
  context counted per process) and the cores allow. At every release of a reservation the ledger is read
  beside NVML: the task's reservation, its process's NVML memory and the device's used memory.
* ``too-small``: as ``packed``, but every estimate a quarter of the measured need and ``enforce_memory`` on,
  so that a task is held to its estimate: first attempts run out of GPU memory, are requeued with the
  estimate raised, and finish.
* ``inprocess``: the clients trained one after another in this process (the plain baseline; last, since it
  initialises CUDA here).

A helper process samples the GPU's used memory through NVML every 50 ms during each variant (a thread would
make fedsup start its fork servers with spawn). The script prints wall times, throughput against one at a
time, GPU memory over time, the ledger against NVML, and for ``too-small`` the attempts and final estimates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import fedsup
from fedsup.engine import devices as ledger
from fedsup.engine.devices import DEFAULT_CONTEXT_MEMORY, DEFAULT_MARGIN, nvml_gpus

HERE = Path(__file__).resolve().parent
MiB = 1024**2
SAMPLER = """
import sys, time, pynvml
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(int(sys.argv[1]))
while True:
    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    print(f"{time.time():.3f} {used} {util}", flush=True)
    time.sleep(0.05)
"""


# ---------------------------------------------------------------- the work


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def make_data(client_id: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(client_id)
    x = torch.randn(samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return x, y


def train_epoch(client_id: int, x: torch.Tensor, y: torch.Tensor, device: str) -> dict[str, Any]:
    # The same kernels whatever else shares the GPU, so that packing cannot change a client's weights.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(client_id)
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = x.to(device), y.to(device)
    total = 0.0
    batches = 0
    for start in range(0, len(x), 64):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
        loss.backward()
        opt.step()
        total += loss.item()
        batches += 1
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"client_id": client_id, "loss": total / batches, "weights": weights}


def final_model(results: list[dict[str, Any]]) -> str:
    """FedAvg of the clients' weights (equal shares, float64, in client order): a digest of its bytes."""
    ordered = sorted(results, key=lambda r: r["client_id"])
    digest = hashlib.sha256()
    for key in ordered[0]["weights"]:
        mean = sum(r["weights"][key].double() for r in ordered) / len(ordered)
        digest.update(mean.numpy().tobytes())
    return digest.hexdigest()[:16]


class CNNClient(fedsup.Task):
    def __init__(self, client_id: int, samples: int, estimate: int) -> None:
        super().__init__(task_id=f"client-{client_id}", estimate_cuda_memory=estimate)
        self.client_id = client_id
        self.samples = samples

    def load(self) -> None:
        self.x, self.y = make_data(self.client_id, self.samples)

    def train(self, device: str) -> dict[str, Any]:
        return train_epoch(self.client_id, self.x, self.y, device)


class ContextProbe(fedsup.Task):
    """NVML's memory for this process, and torch's reserved memory, after each step CUDA work first takes."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]))

        def reading() -> dict[str, int | None]:
            torch.cuda.synchronize()
            used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
            return {"nvml": used.get(os.getpid()), "reserved": torch.cuda.memory_reserved()}

        steps = {}
        torch.ones(1, device=device).add_(1)
        steps["first kernel"] = reading()
        a = torch.randn(1024, 1024, device=device)
        (a @ a).sum().item()
        steps["+ cuBLAS matmul"] = reading()
        conv = torch.nn.Conv2d(3, 32, 3, padding=1).to(device)
        conv(torch.randn(64, 3, 32, 32, device=device)).sum().backward()
        steps["+ cuDNN conv fwd/bwd"] = reading()
        return steps


# ---------------------------------------------------------------- measuring


class Sampler:
    """NVML samples of the GPU's used memory and utilisation, from a process of its own."""

    def __init__(self, index: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SAMPLER, str(index)], stdout=subprocess.PIPE,
                                     text=True)

    def stop(self) -> list[tuple[float, int, int]]:
        self.proc.terminate()
        out, _ = self.proc.communicate()
        rows = []
        for line in out.splitlines():
            t, used, util = line.split()
            rows.append((float(t), int(used), int(util)))
        return rows


@contextmanager
def watch_ledger(rows: list[dict[str, Any]]) -> Iterator[None]:
    """Read the ledger beside NVML whenever a reservation is released: the task's process still holds what it
    allocated (torch keeps its cache), so its NVML memory is the task's real cost to set against the
    reservation. The scheduler runs in this process, so a wrapped method sees every release."""
    original = ledger.Inventory.release

    def release(self: ledger.Inventory, task_id: str, device: ledger.Device, cpus: int) -> None:
        if device.is_gpu and self.probe is not None and device.index is not None:
            used = self.probe.used_by(device.index)
            free = self.probe.free(device.index) or 0
            rows.append({"task_id": task_id, "reserved": device.reservations.get(task_id, 0),
                         "process": used.get(device.pids.get(task_id, -1)), "processes": sum(used.values()),
                         "device_used": device.total - free, "ledger": sum(device.reservations.values())})
        original(self, task_id, device, cpus)

    ledger.Inventory.release = release  # type: ignore[method-assign]
    try:
        yield
    finally:
        ledger.Inventory.release = original  # type: ignore[method-assign]


def timeline(rows: list[tuple[float, int, int]], t0: float, t1: float, width: int = 60) -> str:
    """The peak used memory in each of ``width`` slices of the run, as a bar of eighths."""
    if not rows or t1 <= t0:
        return ""
    peak = max(r[1] for r in rows) or 1
    bars = " ▁▂▃▄▅▆▇█"
    cells = []
    for i in range(width):
        lo, hi = t0 + (t1 - t0) * i / width, t0 + (t1 - t0) * (i + 1) / width
        inside = [r[1] for r in rows if lo <= r[0] < hi]
        cells.append(bars[round(8 * max(inside) / peak)] if inside else " ")
    return "".join(cells)


def run_variant(name: str, fn: Callable[[], dict[str, Any]], index: int | None) -> dict[str, Any]:
    sampler = Sampler(index) if index is not None else None
    t0 = time.time()
    out = fn()
    t1 = time.time()
    rows = sampler.stop() if sampler is not None else []
    during = [r for r in rows if t0 <= r[0] <= t1]
    out.update({
        "variant": name, "wall": t1 - t0,
        "gpu_used_peak": max((r[1] for r in during), default=None),
        "gpu_util_mean": (sum(r[2] for r in during) / len(during)) if during else None,
        "timeline": timeline(during, t0, t1),
    })
    return out


def inprocess(clients: int, samples: int, device: str) -> dict[str, Any]:
    if device == "cpu":
        torch.set_num_threads(1)  # as fedsup pins a cpus=1 task: the same reductions, the same weights
    results = [train_epoch(i, *make_data(i, samples), device) for i in range(clients)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"finished": clients, "loss": statistics.fmean(r["loss"] for r in results),
            "model": final_model(results)}


def supervised(clients: int, samples: int, estimate: int, index: int | None, **options: Any) -> dict[str, Any]:
    tasks = [CNNClient(i, samples, estimate) for i in range(clients)]
    records = fedsup.Supervisor(devices="cpu" if index is None else [index], **options).run(tasks)
    finished = [r for r in records if r.status.value == "FINISHED"]
    concurrent = max_concurrent([(r.train.started, r.train.started + r.train.duration)
                                 for r in records if r.train is not None])
    return {
        "finished": len(finished), "failed": len(records) - len(finished),
        "loss": statistics.fmean(r.result["loss"] for r in finished) if finished else None,
        "model": final_model([r.result for r in finished]) if len(finished) == clients else None,
        "attempts": sum(r.attempts for r in records),
        "interrupts": sum(1 for r in records for a in r.history if a.status == "INTERRUPT"),
        "peak_gpu_memory_max": max((r.peak_gpu_memory or 0) for r in records),
        "peaks": {r.task_id: r.peak_gpu_memory for r in records},
        "final_estimates": sorted({r.estimate_cuda_memory for r in records}),
        "max_concurrent": concurrent,
        "errors": sorted({r.error.summary() for r in records if r.error is not None})[:3],
    }


def max_concurrent(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one of their own starts (enough for a few dozen clients)."""
    return max((sum(1 for s, e in spans if s <= t < e) for t, _ in spans), default=0)


def measure_context(index: int) -> dict[str, dict[str, int | None]]:
    record = fedsup.Supervisor(devices=[index], max_retries=0).run([ContextProbe("context")])[0]
    if record.status.value != "FINISHED":
        raise SystemExit(f"the context probe did not finish on the GPU: {record.error}")
    return dict(record.result)


def probe(samples: int, index: int) -> int:
    """One client with a generous estimate: its measured peak (torch's reserved memory) plus a quarter."""
    record = fedsup.Supervisor(devices=[index], max_retries=0).run([CNNClient(0, samples, 4 * 1024**3)])[0]
    if record.status.value != "FINISHED" or not record.peak_gpu_memory:
        raise SystemExit(f"the probe client did not finish on the GPU: {record.error}")
    return int(record.peak_gpu_memory * 1.25)


def gpu_versions(index: int) -> str:
    """The GPU's name, its driver, and the CUDA versions of the driver and of torch's build."""
    import pynvml

    pynvml.nvmlInit()
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
    driver = pynvml.nvmlSystemGetDriverVersion()
    cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
    text = [x.decode() if isinstance(x, bytes) else x for x in (name, driver)]
    return (f"{text[0]}, driver {text[1]} (CUDA {cuda // 1000}.{cuda % 1000 // 10}), torch {torch.__version__} "
            f"built for CUDA {torch.version.cuda}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4000, help="images per client")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--on-cpu", action="store_true",
                        help="check the script itself where there is no GPU: the same variants on the CPU "
                             "(no estimates, no GPU figures, no too-small variant)")
    args = parser.parse_args(argv)
    # cuBLAS picks among workspace configurations unless told one: fixed, as deterministic kernels need
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.on_cpu:
        return report(args, 0, [
            run_variant("one-at-a-time", lambda: supervised(args.clients, args.samples, 0, None,
                                                            max_training=1), None),
            run_variant("packed", lambda: supervised(args.clients, args.samples, 0, None), None),
            run_variant("inprocess", lambda: inprocess(args.clients, args.samples, "cpu"), None),
        ], "CPU", {}, [])
    # NVML, not torch.cuda: this process must not touch CUDA before fedsup forks its servers (the in-process
    # baseline, which does, runs last).
    gpus, _ = nvml_gpus()
    if not gpus:
        print("bench/gpu.py: no NVIDIA GPU here (NVML finds none); nothing measured")
        return 0
    name = gpu_versions(args.gpu)
    context = measure_context(args.gpu)
    estimate = probe(args.samples, args.gpu)
    print(f"probe: one client's peak GPU memory + 25 % = {estimate / MiB:.0f} MiB (the packed estimate)")
    releases: list[dict[str, Any]] = []

    def packed() -> dict[str, Any]:
        with watch_ledger(releases):
            return supervised(args.clients, args.samples, estimate, args.gpu)

    results = [
        run_variant("one-at-a-time", lambda: supervised(args.clients, args.samples, estimate, args.gpu,
                                                        max_training=1), args.gpu),
        run_variant("packed", packed, args.gpu),
        run_variant("too-small", lambda: supervised(args.clients, args.samples, estimate // 4, args.gpu,
                                                    enforce_memory=True, max_interrupts=8), args.gpu),
        run_variant("inprocess", lambda: inprocess(args.clients, args.samples, f"cuda:{args.gpu}"), args.gpu),
    ]
    return report(args, estimate, results, name, context, releases)


def report(args: argparse.Namespace, estimate: int, results: list[dict[str, Any]], name: str,
           context: dict[str, dict[str, int | None]], releases: list[dict[str, Any]]) -> int:
    cores = len(os.sched_getaffinity(0))
    print(f"\n{name}; {cores} cores; {args.clients} clients x {args.samples} images")
    print_context(context)
    base = next(r["wall"] for r in results if r["variant"] == "one-at-a-time")
    reference = next(r["model"] for r in results if r["variant"] == "one-at-a-time")
    print(f"\n{'variant':<14} {'wall s':>7} {'vs one':>7} {'done':>5} {'tries':>6} {'OOMs':>5} {'at once':>8} "
          f"{'GPU peak MiB':>13} {'util %':>7} {'model':>17} {'same':>5}  GPU memory over the run")
    for r in results:
        peak = r["gpu_used_peak"]
        util = r["gpu_util_mean"]
        same = "yes" if r["model"] is not None and r["model"] == reference else "NO"
        print(f"{r['variant']:<14} {r['wall']:7.2f} {base / r['wall']:6.2f}x {r['finished']:5d} "
              f"{r.get('attempts', '-')!s:>6} {r.get('interrupts', '-')!s:>5} {r.get('max_concurrent', 1)!s:>8} "
              f"{(peak or 0) / MiB:13.0f} {(util or 0):7.0f} {r['model']!s:>17} {same:>5}  {r['timeline']}")
    for r in results:
        if r["variant"] == "too-small":
            finals = ", ".join(f"{e / MiB:.0f}" for e in r["final_estimates"])
            print(f"  too-small: estimates started at {estimate // 4 / MiB:.0f} MiB and ended at {finals} MiB")
        for error in r.get("errors", []):
            print(f"  {r['variant']}: {error}")
    packed = next((r for r in results if r["variant"] == "packed"), None)
    if releases and packed is not None:
        print_ledger(releases, packed["peaks"])
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "cores": cores, "estimate": estimate,
                                               "context": context, "ledger": releases, "results": results},
                                              indent=1))
    return 0


def print_context(context: dict[str, dict[str, int | None]]) -> None:
    if not context:
        return
    print(f"CUDA context of a task process (NVML for the process less torch's reserved; fedsup's default "
          f"cuda_context_memory {DEFAULT_CONTEXT_MEMORY / MiB:.0f} MiB):")
    for step, reading in context.items():
        nvml, reserved = reading["nvml"], reading["reserved"] or 0
        own = "n/a (NVML gives no per-process figure here)" if nvml is None else f"{(nvml - reserved) / MiB:.0f} MiB"
        print(f"  after {step:<22} NVML {(nvml or 0) / MiB:6.0f} MiB, torch reserved {reserved / MiB:5.0f} MiB: "
              f"context {own}")


def spread(values: list[int]) -> str:
    return f"{min(values) / MiB:.0f} to {max(values) / MiB:.0f} MiB"


def print_ledger(releases: list[dict[str, Any]], peaks: dict[str, int | None]) -> None:
    """The ledger against NVML and torch in the packed run, at each release of a reservation."""
    contexts = [r["process"] - (peaks.get(r["task_id"]) or 0) for r in releases if r["process"] is not None]
    slack = [r["reserved"] - r["process"] for r in releases if r["process"] is not None]
    other = [r["device_used"] - r["processes"] for r in releases]
    print(f"\nledger against NVML in the packed run, at {len(releases)} releases (margin {DEFAULT_MARGIN / MiB:.0f} "
          f"MiB):")
    if contexts:
        middle = statistics.median(contexts)
        print(f"  NVML per process less torch's max_memory_reserved (the real context): "
              f"{spread(contexts)}, median {middle / MiB:.0f} MiB")
        print(f"  reservation less NVML per process (what the ledger held over): "
              f"{spread(slack)}; under by more than the margin: "
              f"{sum(1 for s in slack if s < -DEFAULT_MARGIN)} of {len(slack)}")
    print(f"  device used less the processes' sum (driver and other): "
          f"{spread(other)}")
    print(f"  ledger reserved at a release: up to {max(r['ledger'] for r in releases) / MiB:.0f} MiB; "
          f"device used: up to {max(r['device_used'] for r in releases) / MiB:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
