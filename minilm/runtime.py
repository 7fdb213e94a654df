"""One place that decides where and how minilm runs: device, autocast dtype, and DDP.

    rt = setup_runtime("auto")      # cuda if available, else cpu; DDP if launched by torchrun
    rt = setup_runtime("cpu", "fp32")   # force a dtype: auto, bf16 or fp32
    with rt.autocast(): ...
    rt.is_main                      # rank 0 writes checkpoints, logs and plots

dtype "auto" runs under bf16 autocast wherever the chip does bf16 natively: CUDA GPUs that
support it, and CPUs with AVX512-BF16 or AMX tiles (asked of torch, not guessed from the CPU's
name). On such a CPU bf16 roughly doubles the training steps a minute buys (benchmarks/
train_throughput.py); elsewhere bf16 is emulated and slower, so auto keeps float32. Autocast
keeps weights, optimizer state and the softmax/loss reductions in float32. DDP starts only when
`torchrun` set RANK and WORLD_SIZE, with the NCCL backend on GPUs and gloo on CPUs.
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

    def barrier(self) -> None:
        """Under torchrun: wait until every rank gets here (after rank 0 wrote what they read next)."""
        if self.distributed:
            dist.barrier()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


DTYPES = ("auto", "bf16", "fp32")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch's own dispatch sees it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _pick_dtype(use_cuda: bool, dtype: str) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None: plain float32) and the reason, for a device kind and a requested dtype."""
    native = torch.cuda.is_bf16_supported() if use_cuda else cpu_has_bf16()
    chip = "this GPU" if use_cuda else "this CPU"
    if dtype == "fp32":
        return None, "float32 (asked for)"
    if dtype == "bf16":
        return torch.bfloat16, "bf16 autocast (asked for)" + ("" if native else f"; {chip} emulates bf16, so it is slow")
    if native:
        return torch.bfloat16, f"bf16 autocast ({chip} has native bf16)"
    return None, f"float32 ({chip} has no native bf16)"


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick the device and dtype (and join the DDP group under torchrun); log the reasons once."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise MinilmError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dtype not in DTYPES:
        raise MinilmError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
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
    else:
        dev = torch.device("cpu")
    autocast_dtype, why = _pick_dtype(use_cuda, dtype)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rt = Runtime(dev, autocast_dtype, rank, local_rank, world)
    if rt.is_main:
        log.info("runtime: %s, %s%s", dev, why, f", DDP over {world} processes" if world > 1 else "")
    return rt


def teardown_runtime(rt: Runtime | None = None) -> None:
    """Leave the process group that setup_runtime joined under torchrun (rt None: any that is open)."""
    if (rt is None or rt.distributed) and dist.is_initialized():
        dist.destroy_process_group()
