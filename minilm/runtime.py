"""One place that decides where and how minilm runs: device, autocast dtype, and DDP.

    rt = setup_runtime("auto")      # cuda if available, else cpu; DDP if launched by torchrun
    with rt.autocast(): ...
    rt.is_main                      # rank 0 writes checkpoints, logs and plots

bf16 autocast is used on CUDA GPUs that support it; CPU runs in float32, which is the fastest
exact choice on the small CPUs minilm targets. DDP starts only when `torchrun` set RANK and
WORLD_SIZE, with the NCCL backend on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minilm import MinilmError

log = logging.getLogger("minilm")


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: run in float32, no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device: str = "auto") -> Runtime:
    """Pick the device and dtype (and join the DDP group under torchrun); log the reasons once."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise MinilmError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinilmError(f"device {device!r} requested but this torch sees no CUDA GPU; use --device cpu")
    # torchrun sets these; a plain `python` run is rank 0 of 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        # under DDP each process takes the GPU of its local rank; an explicit cuda:N is honoured alone
        dev = torch.device(f"cuda:{local_rank}" if world > 1 or device in ("auto", "cuda") else device)
        torch.cuda.set_device(dev)
        bf16 = torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else None
        why = "bf16 autocast" if bf16 else "float32 (this GPU has no bf16)"
    else:
        dev, dtype, why = torch.device("cpu"), None, "float32 (CPU)"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rt = Runtime(dev, dtype, rank, local_rank, world)
    if rt.is_main:
        log.info("runtime: %s, %s%s", dev, why, f", DDP over {world} processes" if world > 1 else "")
    return rt


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
