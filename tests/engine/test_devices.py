"""The device inventory and its placement ledger, with described devices and a fake NVML. No GPU needed."""

from __future__ import annotations

import types

import pytest

import fedsup.engine.devices as devices
from fedsup.engine.devices import DEFAULT_CONTEXT_MEMORY, DEFAULT_MARGIN, Device, Inventory
from fedsup.engine.errors import ConfigError

GiB = 1024**3
MiB = 1024**2


def described(*sizes: int, cores: int = 8, **kw) -> Inventory:
    return Inventory([Device(f"cuda:{i}", "cuda", s, index=i, described=True) for i, s in enumerate(sizes)],
                     cores=cores, **kw)


# ---------------------------------------------------------------- building an inventory


def test_from_spec_described_devices():
    inv = Inventory.from_spec([{"name": "cuda:0", "memory": "16GiB"}, {"name": "cuda:3", "memory": 8 * GiB}],
                              cores=6)
    assert [(g.name, g.kind, g.total, g.index, g.described) for g in inv.gpus] == [
        ("cuda:0", "cuda", 16 * GiB, 0, True), ("cuda:3", "cuda", 8 * GiB, 3, True)]
    assert inv.cpu.name == "cpu" and inv.cpu.kind == "cpu" and inv.cpu.cores == 6 and not inv.cpu.is_gpu
    assert [d.name for d in inv.devices] == ["cuda:0", "cuda:3", "cpu"]
    assert inv.get("cuda:3") is inv.gpus[1] and inv.get("cpu") is inv.cpu and inv.get("cuda:9") is None
    assert inv.probe is None
    assert inv.summary() == "cuda:0 16.0 GiB, cuda:3 8.0 GiB, cpu 6 cores"


def test_from_spec_names_default_to_the_position_and_an_index_may_be_given():
    inv = Inventory.from_spec([{"memory": "1GiB"}, {"memory": "2GiB", "name": "cuda:5", "index": 1}], cores=1)
    assert [(g.name, g.index) for g in inv.gpus] == [("cuda:0", 0), ("cuda:5", 1)]


def test_from_spec_cpu():
    inv = Inventory.from_spec("cpu", cores=3)
    assert inv.gpus == [] and inv.cpu.cores == 3
    assert inv.candidates(None) == [inv.cpu]
    assert inv.largest_capacity() == 0


def test_margin_and_context_are_settable():
    inv = Inventory.from_spec([{"memory": "4GiB"}], cores=1, margin=0, context_memory=0)
    assert inv.capacity(inv.gpus[0]) == 4 * GiB


@pytest.mark.parametrize("spec, where", [
    ([{"name": "gpu0", "memory": "1GiB"}], "devices[0].name"),
    ([{"name": "cuda:x", "memory": "1GiB"}], "devices[0].name"),
    ([{"memory": "1GiB"}, {"name": "cuda:1"}], "devices[1]"),
    ([{"memory": "1GiB"}, "cuda:1"], "devices[1]"),
    ([{"memory": "12 parsecs"}], "devices[0].memory"),
    ([{"memory": 0}], "devices[0].memory"),
    ([{"memory": "0GiB"}], "devices[0].memory"),
    ([{"memory": "1GiB"}, {"name": "cuda:0", "memory": "1GiB"}], "devices: names must be unique"),
    ([], "devices:"),
    ("banana", "devices:"),
    (7, "devices:"),
    ([True], "devices[0]"),
])
def test_from_spec_rejects_bad_specs_naming_the_field(spec, where):
    with pytest.raises(ConfigError) as info:
        Inventory.from_spec(spec, cores=1)
    assert where in str(info.value)


def test_gpu_indices_without_nvml_are_a_config_error(monkeypatch):
    monkeypatch.setattr(devices, "_nvml", lambda: None)
    with pytest.raises(ConfigError, match="NVML finds no NVIDIA driver"):
        Inventory.from_spec([0, 1], cores=1)
    # "auto" without NVML is the CPU alone
    inv = Inventory.from_spec("auto", cores=2)
    assert inv.gpus == [] and inv.probe is None


class FakeNvml:
    """Just enough of pynvml: two GPUs, free memory and per-process use set by the test."""

    class NVMLError(Exception):
        pass

    def __init__(self, totals: list[int]) -> None:
        self.totals = totals
        self.free = list(totals)
        self.used: dict[int, dict[int, int]] = {i: {} for i in range(len(totals))}

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - pynvml's names
        return len(self.totals)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int):  # noqa: N802
        return types.SimpleNamespace(total=self.totals[h], free=self.free[h])

    def nvmlDeviceGetComputeRunningProcesses(self, h: int):  # noqa: N802
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.used[h].items()]


def test_gpu_indices_through_nvml(monkeypatch):
    nvml = FakeNvml([16 * GiB, 24 * GiB])
    monkeypatch.setattr(devices, "_nvml", lambda: nvml)
    inv = Inventory.from_spec((1,), cores=2)
    assert [(g.name, g.index, g.total, g.described) for g in inv.gpus] == [("cuda:1", 1, 24 * GiB, False)]
    with pytest.raises(ConfigError, match="GPU index 2 does not exist"):
        Inventory.from_spec([2], cores=2)
    assert [g.name for g in Inventory.from_spec("auto", cores=2).gpus] == ["cuda:0", "cuda:1"]


def test_room_with_a_probe_counts_what_placed_tasks_have_not_allocated_yet(monkeypatch):
    nvml = FakeNvml([16 * GiB])
    monkeypatch.setattr(devices, "_nvml", lambda: nvml)
    inv = Inventory.from_spec("auto", cores=4)
    gpu = inv.gpus[0]
    assert inv.room(gpu) == 16 * GiB - DEFAULT_MARGIN
    # another process, not ours, holds 3 GiB: the free memory says so
    nvml.free[0] = 13 * GiB
    assert inv.room(gpu) == 13 * GiB - DEFAULT_MARGIN
    # we place a task: it reserves 4 GiB but has allocated only 1 GiB so far
    assert inv.place("a", 4 * GiB - DEFAULT_CONTEXT_MEMORY, 1, [gpu]) is gpu
    gpu.pids["a"] = 4242
    nvml.used[0] = {4242: 1 * GiB}
    nvml.free[0] = 12 * GiB
    assert inv.room(gpu) == 12 * GiB - 3 * GiB - DEFAULT_MARGIN
    # and never more than the ledger allows, whatever NVML says
    nvml.free[0] = 16 * GiB
    assert inv.room(gpu) == 16 * GiB - 4 * GiB - DEFAULT_MARGIN
    inv.release("a", gpu, 1)
    assert gpu.reservations == {} and gpu.pids == {}


# ---------------------------------------------------------------- the ledger


def test_capacity_is_total_minus_margin_minus_context():
    inv = described(16 * GiB)
    assert inv.capacity(inv.gpus[0]) == 16 * GiB - DEFAULT_MARGIN - DEFAULT_CONTEXT_MEMORY
    assert inv.largest_capacity() == inv.capacity(inv.gpus[0])
    assert described(8 * GiB, 24 * GiB).largest_capacity() == 24 * GiB - DEFAULT_MARGIN - DEFAULT_CONTEXT_MEMORY


def test_cost_includes_a_context_unless_resident():
    inv = described(16 * GiB)
    assert inv.cost(GiB, resident=False) == GiB + DEFAULT_CONTEXT_MEMORY
    assert inv.cost(GiB, resident=True) == GiB


def test_place_takes_the_freest_device_and_reserves_on_it():
    inv = described(8 * GiB, 16 * GiB)
    small, big = inv.gpus
    assert inv.place("a", 4 * GiB, 1, inv.gpus) is big
    assert big.reservations == {"a": 4 * GiB + DEFAULT_CONTEXT_MEMORY}
    assert inv.room(big) == 16 * GiB - 4 * GiB - DEFAULT_CONTEXT_MEMORY - DEFAULT_MARGIN
    assert inv.place("b", 4 * GiB, 1, inv.gpus) is big     # 11.3 GiB left beats 7.75
    assert inv.place("c", 4 * GiB, 1, inv.gpus) is small   # 7.75 beats 6.8
    assert inv.cpu.used_cores == 3


def test_place_ties_go_to_the_first_candidate():
    inv = described(8 * GiB, 8 * GiB)
    assert inv.place("a", GiB, 1, inv.gpus) is inv.gpus[0]
    assert inv.place("b", GiB, 1, list(reversed(inv.gpus))) is inv.gpus[1]


def test_place_returns_none_when_nothing_fits_and_reserves_nothing():
    inv = described(16 * GiB)
    gpu = inv.gpus[0]
    cap = inv.capacity(gpu)
    assert inv.place("big", cap + 1, 1, [gpu]) is None
    assert gpu.reservations == {} and inv.cpu.used_cores == 0
    assert inv.place("exact", cap, 1, [gpu]) is gpu
    assert inv.room(gpu) == 0
    assert inv.place("tiny", 0, 1, [gpu]) is None


def test_two_6gib_tasks_per_16gib_device():
    inv = described(16 * GiB)
    gpu = inv.gpus[0]
    assert inv.place("a", 6 * GiB, 1, [gpu]) is gpu
    assert inv.place("b", 6 * GiB, 1, [gpu]) is gpu
    assert inv.place("c", 6 * GiB, 1, [gpu]) is None
    inv.release("a", gpu, 1)
    assert inv.place("c", 6 * GiB, 1, [gpu]) is gpu
    assert set(gpu.reservations) == {"b", "c"}


def test_a_resident_process_pays_no_second_context():
    inv = described(16 * GiB)
    gpu = inv.gpus[0]
    assert inv.place("a", 2 * GiB, 1, [gpu], resident="cuda:0") is gpu
    assert gpu.reservations["a"] == 2 * GiB
    assert inv.place("b", 2 * GiB, 1, [gpu], resident="cuda:5") is gpu   # resident elsewhere: pays
    assert gpu.reservations["b"] == 2 * GiB + DEFAULT_CONTEXT_MEMORY
    # the largest estimate that fits when resident is one context larger than the capacity
    inv2 = described(16 * GiB)
    g2 = inv2.gpus[0]
    assert inv2.place("x", inv2.capacity(g2) + DEFAULT_CONTEXT_MEMORY, 1, [g2], resident="cuda:0") is g2


def test_place_on_the_cpu_counts_cores():
    inv = Inventory([], cores=4)
    cpu = inv.cpu
    assert inv.place("a", 0, 2, [cpu]) is cpu
    assert inv.place("b", 0, 2, [cpu]) is cpu
    assert inv.place("c", 0, 1, [cpu]) is None
    assert cpu.used_cores == 4 and cpu.reservations == {}
    inv.release("a", cpu, 2)
    assert inv.place("c", 0, 3, [cpu]) is None
    assert inv.place("c", 0, 2, [cpu]) is cpu
    assert cpu.used_cores == 4


def test_a_task_wanting_more_cores_than_exist_runs_alone():
    inv = Inventory([], cores=4)
    assert inv.place("huge", 0, 8, [inv.cpu]) is inv.cpu
    assert inv.place("small", 0, 1, [inv.cpu]) is None
    inv.release("huge", inv.cpu, 8)
    assert inv.place("small", 0, 1, [inv.cpu]) is inv.cpu
    assert inv.place("huge", 0, 8, [inv.cpu]) is None


def test_cpu_limit_overrides_the_cores():
    inv = Inventory([], cores=8)
    assert inv.place("a", 0, 2, [inv.cpu], cpu_limit=3) is inv.cpu
    assert inv.place("b", 0, 2, [inv.cpu], cpu_limit=3) is None
    assert inv.place("b", 0, 2, [inv.cpu]) is inv.cpu


def test_gpu_tasks_use_cores_too():
    inv = described(80 * GiB, cores=2)
    gpu = inv.gpus[0]
    assert inv.place("a", GiB, 2, [gpu]) is gpu
    assert inv.place("b", GiB, 1, [gpu]) is None, "the GPU has room but the cores are taken"
    assert gpu.reservations.keys() == {"a"}


def test_candidates():
    inv = described(8 * GiB, 8 * GiB)
    assert inv.candidates(None) == inv.gpus
    assert inv.candidates(None) is not inv.gpus, "a copy: callers may not edit the inventory's list"
    assert inv.candidates("cuda:1") == [inv.gpus[1]]
    assert inv.candidates("cpu") == [inv.cpu]
    with pytest.raises(ConfigError) as info:
        inv.candidates("cuda:2")
    assert "'cuda:2'" in str(info.value) and "cuda:0, cuda:1, cpu" in str(info.value)


def test_release_of_something_not_reserved_is_harmless_for_memory():
    inv = described(8 * GiB)
    gpu = inv.gpus[0]
    inv.place("a", GiB, 1, [gpu])
    inv.release("zzz", gpu, 0)
    assert gpu.reservations.keys() == {"a"}


def test_default_cores_are_this_machine_s():
    assert Inventory([]).cpu.cores == devices.cpu_cores() >= 1
