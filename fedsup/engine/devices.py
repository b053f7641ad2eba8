"""Devices and the memory ledger that places tasks on them.

The supervisor never initialises CUDA: it reads GPUs through NVML (nvidia-ml-py, module ``pynvml``) and
pins each child to its GPU with CUDA_VISIBLE_DEVICES. A described inventory (names and sizes, no hardware)
stands in for GPUs in tests and dry runs.

A GPU's room for one more task is its free memory, minus what placed tasks have reserved but not yet
allocated, minus a margin; a process that is not yet resident on the device also pays for its CUDA context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedsup.engine.errors import ConfigError
from fedsup.engine.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

# What a task process's CUDA context holds beyond torch's own memory: measured on an H200 (driver 580, CUDA 13.0,
# torch 2.11) at 610 MiB after a first kernel, 660 MiB once cuBLAS and cuDNN had run, 694 MiB in a CNN client;
# older CUDA versions and smaller GPUs take less, so this errs on the side of not overcommitting.
DEFAULT_CONTEXT_MEMORY = 768 * 1024**2
DEFAULT_MARGIN = 256 * 1024**2


class MemoryProbe(Protocol):
    """Where a GPU's live numbers come from: NVML for real devices, nothing for described ones."""

    def free(self, index: int) -> int | None: ...

    def used_by(self, index: int) -> dict[int, int]: ...


@dataclass
class Device:
    name: str                       # as records show it: "cuda:1", "cpu"
    kind: str                       # "cuda" or "cpu"
    total: int = 0                  # bytes (GPU memory); 0 for the CPU
    index: int | None = None        # CUDA index, for CUDA_VISIBLE_DEVICES
    cores: int = 0                  # for the CPU device
    described: bool = False         # no hardware behind it
    reservations: dict[str, int] = field(default_factory=dict)   # task_id -> bytes reserved
    pids: dict[str, int] = field(default_factory=dict)           # task_id -> pid, once known
    used_cores: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class NvmlProbe:
    def __init__(self, pynvml: Any) -> None:
        self.nvml = pynvml

    def free(self, index: int) -> int | None:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(handle).free)

    def used_by(self, index: int) -> dict[int, int]:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self.nvml.NVMLError:
            return {}
        return {int(p.pid): int(p.usedGpuMemory or 0) for p in procs}


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU: all mean "no NVML here"
        log.debug("NVML unavailable: %s", exc)
        return None


def nvml_gpus(indices: list[int] | None = None) -> tuple[list[Device], NvmlProbe | None]:
    nvml = _nvml()
    if nvml is None:
        if indices:
            raise ConfigError(f"devices: GPUs {indices} were asked for, but NVML finds no NVIDIA driver here")
        return [], None
    count = nvml.nvmlDeviceGetCount()
    wanted = list(range(count)) if indices is None else indices
    gpus = []
    for i in wanted:
        if not 0 <= i < count:
            raise ConfigError(f"devices: GPU index {i} does not exist (this machine has {count})")
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        gpus.append(Device(f"cuda:{i}", "cuda", int(nvml.nvmlDeviceGetMemoryInfo(handle).total), index=i))
    return gpus, NvmlProbe(nvml)


def describe_gpus() -> list[dict[str, Any]]:
    """What ``fedsup devices`` shows: every GPU with its name, total and free memory."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        out.append({"name": f"cuda:{i}", "model": name.decode() if isinstance(name, bytes) else name,
                    "total": int(info.total), "free": int(info.free)})
    return out


def _described(entry: Any, position: int) -> Device:
    field_name = f"devices[{position}]"
    if not isinstance(entry, dict) or "memory" not in entry:
        raise ConfigError(f"{field_name}: expected {{name: cuda:N, memory: 16GiB}}, got {entry!r}")
    name = entry.get("name", f"cuda:{position}")
    if not isinstance(name, str) or not name.startswith("cuda:") or not name[5:].isdigit():
        raise ConfigError(f"{field_name}.name: expected a name such as 'cuda:0', got {name!r}")
    total = parse_bytes(entry["memory"], f"{field_name}.memory")
    if total <= 0:
        raise ConfigError(f"{field_name}.memory: must be more than 0, got {entry['memory']!r}")
    return Device(name, "cuda", total, index=int(entry.get("index", name[5:])), described=True)


class Inventory:
    """The devices of a run and what is reserved on each: the placement ledger."""

    def __init__(
        self,
        gpus: list[Device],
        cores: int | None = None,
        probe: MemoryProbe | None = None,
        margin: int = DEFAULT_MARGIN,
        context_memory: int = DEFAULT_CONTEXT_MEMORY,
    ) -> None:
        names = [g.name for g in gpus]
        if len(set(names)) != len(names):
            raise ConfigError(f"devices: names must be unique, got {names}")
        self.gpus = gpus
        self.cpu = Device("cpu", "cpu", cores=cores or cpu_cores())
        self.probe = probe
        self.margin = margin
        self.context_memory = context_memory

    @classmethod
    def from_spec(cls, spec: Any, **kwargs: Any) -> Inventory:
        """``"auto"``, ``"cpu"``, a list of GPU indices, or a list of described devices."""
        if spec is None or spec == "auto":
            gpus, probe = nvml_gpus()
            return cls(gpus, probe=probe, **kwargs)
        if spec == "cpu":
            return cls([], **kwargs)
        entries = list(spec) if isinstance(spec, (list, tuple)) else []
        if entries and all(isinstance(i, int) and not isinstance(i, bool) for i in entries):
            gpus, probe = nvml_gpus(list(spec))
            return cls(gpus, probe=probe, **kwargs)
        if isinstance(spec, (list, tuple)) and spec:
            return cls([_described(e, i) for i, e in enumerate(spec)], **kwargs)
        raise ConfigError(
            "devices: expected 'auto', 'cpu', a list of GPU indices such as [0, 1], or a list of described devices "
            f"such as [{{name: cuda:0, memory: 16GiB}}], got {spec!r}"
        )

    @property
    def devices(self) -> list[Device]:
        return [*self.gpus, self.cpu]

    def get(self, name: str) -> Device | None:
        return next((d for d in self.devices if d.name == name), None)

    # -- the ledger

    def cost(self, estimate: int, resident: bool) -> int:
        """What a task reserves on a GPU: its estimate, plus a CUDA context unless its process has one there."""
        return estimate + (0 if resident else self.context_memory)

    def room(self, device: Device) -> int:
        """Bytes a new reservation may take on ``device`` now."""
        reserved = sum(device.reservations.values())
        free = self.probe.free(device.index) if (self.probe and device.index is not None) else None
        if free is None:
            return device.total - reserved - self.margin
        used = self.probe.used_by(device.index) if (self.probe and device.index is not None) else {}
        # What placed tasks have not yet allocated still belongs to them.
        pending = sum(max(0, r - used.get(device.pids.get(t, -1), 0)) for t, r in device.reservations.items())
        return min(free - pending, device.total - reserved) - self.margin

    def capacity(self, device: Device) -> int:
        """The largest estimate that could ever run on ``device``, with nothing else on it."""
        return device.total - self.margin - self.context_memory

    def largest_capacity(self) -> int:
        return max((self.capacity(g) for g in self.gpus), default=0)

    def candidates(self, task_device: str | None) -> list[Device]:
        """Devices a task may use: its pin, else every GPU, else the CPU."""
        if task_device is not None:
            device = self.get(task_device)
            if device is None:
                known = ", ".join(d.name for d in self.devices)
                raise ConfigError(f"device: {task_device!r} is not in this run's inventory ({known})")
            return [device]
        return list(self.gpus) or [self.cpu]

    def place(self, task_id: str, estimate: int, cpus: int, candidates: list[Device], resident: str | None = None,
              cpu_limit: int | None = None) -> Device | None:
        """Reserve the freest device that fits, or None when none fits now (the task stays pending)."""
        if cpus + self.cpu.used_cores > (cpu_limit or self.cpu.cores) and self.cpu.used_cores > 0:
            return None
        best: tuple[int, Device] | None = None
        for device in candidates:
            if not device.is_gpu:
                best = best or (0, device)
                continue
            room = self.room(device) - self.cost(estimate, resident == device.name)
            if room >= 0 and (best is None or room > best[0]):
                best = (room, device)
        if best is None:
            return None
        device = best[1]
        if device.is_gpu:
            device.reservations[task_id] = self.cost(estimate, resident == device.name)
        self.cpu.used_cores += cpus
        return device

    def release(self, task_id: str, device: Device, cpus: int) -> None:
        device.reservations.pop(task_id, None)
        device.pids.pop(task_id, None)
        self.cpu.used_cores -= cpus

    def summary(self) -> str:
        parts = [f"{g.name} {format_bytes(g.total)}" for g in self.gpus]
        parts.append(f"cpu {self.cpu.cores} cores")
        return ", ".join(parts)
