"""`minilm.ops.masked_ffn` and `minilm.ops.compact_ffn`: the gated-SiLU FFN over kept neurons only.

Structured pruning (arXiv 2302.03773, section 3; lessons/11_pruning.md) removes FFN neurons: neuron j
is rows j and F + j of `gate_up_weight` (2F, D) and column j of `down_weight` (D, F). A 0/1 `mask`
(F,) says which are kept. Three ways to compute the pruned FFN, equal up to rounding:

    reference   masked_ffn_reference: every neuron computed, pruned ones multiplied by 0 (dense cost)
    kernel      masked_ffn: our op (csrc/masking/) gathers the K kept neurons once and runs dense
                matmuls over them only, forward and backward (cost ~ K / F of dense)
    compacted   compact_ffn: the kept weights as new smaller tensors (minilm/prune/compact.py
                builds a whole smaller model from them)

    from minilm.ops import masked_ffn
    y = masked_ffn(x, mlp.gate_up_proj.weight, mlp.down_proj.weight, mask)   # (..., D)

Backend, chosen once at import like attention's (minilm/ops/attention.py), same `MINILM_OPS`:
our kernel (CUDA tensors -> csrc/masking/masking_cuda.cu when built with CUDA, CPU tensors ->
masking_cpu.cpp) when `minilm._C` is built, else the reference. MINILM_OPS=reference (or torch,
which has no masked FFN of its own) forces the reference; MINILM_OPS=cpu leaves CUDA tensors to it.
The kernel gives no gradient for the mask; a mask that needs one (straight-through movement/GUM
scores) is applied as act * mask by `minilm.model.MLP` instead.
"""

from __future__ import annotations

import logging
import os

import torch

from minilm.ops import _kernels
from minilm.ops.reference import ffn_compact_reference, masked_ffn_reference

log = logging.getLogger("minilm.ops")


def _choose_backend() -> str:
    """'kernel' or 'reference'. attention.py has already refused an unavailable MINILM_OPS value."""
    forced = os.environ.get("MINILM_OPS", "").strip().lower()
    if forced in ("reference", "torch") or not _kernels.LOADED:  # torch has no masked FFN
        log.info("minilm.ops: masked_ffn backend 'reference'%s",
                 " (forced by MINILM_OPS)" if forced else " (minilm._C is not built)")
        return "reference"
    return "kernel"


BACKEND = _choose_backend()
# devices our kernel runs on: MINILM_OPS=cpu keeps CUDA tensors on the reference
KERNEL_DEVICES = ("cpu",) if os.environ.get("MINILM_OPS", "").strip().lower() == "cpu" else _kernels.DEVICES


def check_ffn(x: torch.Tensor | None, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
              mask: torch.Tensor) -> None:
    """Raise ValueError saying what is wrong unless the shapes fit and mask is 1-D of 0/1 values."""
    if gate_up_weight.dim() != 2 or down_weight.dim() != 2 or mask.dim() != 1:
        raise ValueError(f"masked FFN expects gate_up_weight (2F, D), down_weight (D, F), mask (F,); got "
                         f"{tuple(gate_up_weight.shape)}, {tuple(down_weight.shape)}, {tuple(mask.shape)}")
    d, f = down_weight.shape  # (D, F)
    if gate_up_weight.shape != (2 * f, d) or (x is not None and x.shape[-1] != d):
        raise ValueError(f"masked FFN: shapes do not fit: down_weight (D, F) = {(d, f)} needs gate_up_weight "
                         f"{(2 * f, d)}, got {tuple(gate_up_weight.shape)}"
                         + ("" if x is None else f", and x (..., {d}), got {tuple(x.shape)}"))
    if mask.shape[0] != f:
        raise ValueError(f"masked FFN: mask has {mask.shape[0]} entries but the layer has {f} neurons; "
                         f"pass one 0/1 entry per neuron")
    if not bool(((mask == 0) | (mask == 1)).all()):  # the kernel gathers kept rows
        raise ValueError("masked FFN: mask values must be exactly 0 (pruned) or 1 (kept); for soft or "
                         "straight-through masks multiply the activations (masked_ffn_reference)")


def _use_kernel(x: torch.Tensor, backend: str | None) -> bool:
    backend = backend or BACKEND
    if backend not in ("kernel", "reference"):
        raise ValueError(f"masked_ffn: backend must be 'kernel' or 'reference', got {backend!r}")
    if backend == "kernel" and not _kernels.LOADED:
        raise ValueError(f"masked_ffn: backend 'kernel' needs minilm._C, which is not built "
                         f"({_kernels.LOAD_ERROR}); build it with `pip install --no-build-isolation -e .`")
    return backend == "kernel" and x.device.type in KERNEL_DEVICES  # else the reference


def masked_ffn(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
               mask: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The FFN of kept neurons only: x (..., D) -> (..., D). backend: None (the import-time choice),
    'kernel' or 'reference'. Gradients flow to x and both weights (zero for pruned neurons)."""
    check_ffn(x, gate_up_weight, down_weight, mask)
    # the kernel returns no mask gradient: refuse, rather than silently train nothing
    if mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("masked_ffn gives no gradient for the mask; detach it, or multiply the "
                         "activations by it (masked_ffn_reference) to train through it")
    if not _use_kernel(x, backend):
        return masked_ffn_reference(x, gate_up_weight, down_weight, mask)  # dense cost, same numbers
    if torch.is_autocast_enabled(x.device.type):   # a custom op is not autocast: cast as it would a matmul
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up_weight, down_weight = x.to(dtype), gate_up_weight.to(dtype), down_weight.to(dtype)
    # [0]: out (..., D); [1]: the (N, 2K) hidden, saved for the backward (see _kernels.py)
    return torch.ops.minilm.masked_ffn_fwd(x, gate_up_weight, down_weight, mask.to(x.dtype))[0]


def compact_ffn(gate_up_weight: torch.Tensor, down_weight: torch.Tensor, mask: torch.Tensor,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept neurons' weights as new dense tensors, in order: (2K, D) gate+up rows, (D, K) down."""
    check_ffn(None, gate_up_weight, down_weight, mask)
    if not _use_kernel(gate_up_weight, backend):
        return ffn_compact_reference(gate_up_weight, down_weight, mask)
    return tuple(torch.ops.minilm.ffn_compact(gate_up_weight, down_weight, mask))  # (2K, D), (D, K)


def kept_count(mask: torch.Tensor | None, width: int) -> int:
    """How many neurons a mask keeps (all `width` for None)."""
    return width if mask is None else int(mask.count_nonzero())
