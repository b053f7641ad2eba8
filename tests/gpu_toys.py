"""Tasks that do real CUDA work, for the tests marked gpu."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fedsup


class Allocate(fedsup.Task):
    """Holds ``gib`` GiB on its device for the whole train phase; reports what the child saw."""

    def __init__(self, task_id: str, gib: float, estimate: str, hold: float = 0.0) -> None:
        super().__init__(task_id, estimate_cuda_memory=estimate)
        self.gib = gib
        self.hold = hold

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import time

        import torch

        block = torch.empty(int(self.gib * 1024**3), dtype=torch.uint8, device=device)
        block.fill_(1)
        torch.cuda.synchronize()
        end = time.time() + self.hold
        while time.time() < end:  # keep the memory held while others are placed
            torch.cuda._sleep(1_000_000)
            torch.cuda.synchronize()
        return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device, "ppid": os.getppid(),
                "count": torch.cuda.device_count(), "sum": int(block[:10].sum())}


class OomOnce(fedsup.Task):
    """Asks for far more than any GPU has on its first attempt; a small tensor on the next."""

    def __init__(self, task_id: str, marker_dir: str) -> None:
        super().__init__(task_id, estimate_cuda_memory="1GiB")
        self.marker = str(Path(marker_dir) / f"{task_id}.tried")

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import torch

        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            torch.empty(10 * 1024**4, dtype=torch.uint8, device=device)  # 10 TiB: a real CUDA OOM
        return {"ok": float(torch.ones(4, device=device).sum())}


class ContextSize(fedsup.Task):
    """Reports the GPU memory its process holds through NVML: the CUDA context plus what torch reserved; with
    ``libraries``, after a cuBLAS matmul and a cuDNN convolution too (each loads its kernels and workspace)."""

    def __init__(self, task_id: str, libraries: bool = False) -> None:
        super().__init__(task_id)
        self.libraries = libraries

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import pynvml
        import torch

        torch.ones(1, device=device)
        if self.libraries:
            a = torch.randn(1024, 1024, device=device)
            (a @ a).sum().item()
            conv = torch.nn.Conv2d(3, 32, 3, padding=1).to(device)
            conv(torch.randn(64, 3, 32, 32, device=device)).sum().backward()
        torch.cuda.synchronize()
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]))
        used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return {"nvml_used": used.get(os.getpid()), "torch_reserved": torch.cuda.memory_reserved()}
