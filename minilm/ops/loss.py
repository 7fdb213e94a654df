"""`minilm.ops.cross_entropy`: the language-modelling loss, fused into one read of the logits.

    from minilm.ops import cross_entropy
    loss = cross_entropy(logits.flatten(0, 1), targets.flatten())   # mean over targets != -100

It equals `F.cross_entropy(logits.float(), targets, ignore_index=-100)` (tests check values and fp64
gradients against `reference.cross_entropy_reference`), but under bf16 autocast it takes the bf16
logits as they are: no float32 copy of the (N, V) logits, no (N, V) log-softmax kept for the
backward (only each row's logsumexp), and the gradient is written once, in the logits' dtype
(csrc/loss/, why: the head of cross_entropy_cpu.cpp). In a small model the logits are the largest
activation, so this is the biggest cut in a training step after the matmuls
(benchmarks/train_vs_nanogpt.py --profile shows the split).
Backend: PyTorch's `F.cross_entropy` on float32 logits, unless MINILM_FUSED_LOSS=1, which picks
our kernel on the devices `minilm._C` was built for (`MINILM_OPS=reference` or `torch` still turn
it off); float16 on the CPU, or no kernels, take PyTorch's path. Opt-in because its last-bit rounding differs from
PyTorch's, which changes every number a run produces (the quoted runs of the course use PyTorch's).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from minilm.ops import _kernels

KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                 "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 # shapes only: the fake kernel, so minilm/memory.py plans what the kernel saves
                 "meta": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
# Opt-in for now (MINILM_FUSED_LOSS=1): the kernel's sums round differently from PyTorch's in the last
# bit, and over a training run that moves every later number; the course's quoted runs use PyTorch's path.
USE_KERNEL = (_kernels.LOADED and os.environ.get("MINILM_FUSED_LOSS", "0").strip() == "1"
              and os.environ.get("MINILM_OPS", "").strip().lower() not in ("reference", "torch"))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) for targets (N,) over the rows whose target != ignore_index."""
    device = logits.device.type
    on_kernel_device = device in _kernels.DEVICES or device == "meta"
    if not (USE_KERNEL and on_kernel_device and logits.dtype in KERNEL_DTYPES.get(device, ())):
        # PyTorch's own path, exactly as Phi3.forward always computed it (the reference is the same math,
        # but its sums round differently, and so would every number a run produces)
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    rows, _lse = torch.ops.minilm.cross_entropy_fwd(logits.contiguous(), targets.contiguous(), ignore_index)
    return rows.sum() / (targets != ignore_index).sum()  # rows are 0 where ignored: the mean over kept rows
