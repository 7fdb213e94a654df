"""`minilm.ops.attention`: scaled dot-product attention with grouped-query heads.

One function, several backends, chosen once at import (and forced with the environment variable
`MINILM_OPS`, or per call with `backend=`):

    cuda       our fused kernel (csrc/attention/attention_cuda.cu) on CUDA tensors, fp16/bf16;
               CPU tensors go to our CPU kernel
    cpu        our fused kernel (csrc/attention/attention_cpu.cpp) on CPU tensors, fp32/fp64/bf16
    torch      PyTorch's `scaled_dot_product_attention` (fused, fast on CPU and GPU)
    reference  the naive definition in `minilm/ops/reference.py` (for tests and lessons)

The default is our kernels (cuda if built with CUDA and a GPU is present, else cpu) when `minilm._C`
is built, else the reference. Our training kernels take no key mask and no sliding window: calls with
one (a Phi-3 window shorter than the keys, padded batches) and calls in a dtype, head dim or on a
device the kernel does not cover (fp32 on CUDA, say) go to SDPA with an explicit boolean mask.
Decoding is the exception: a KV-cache step (at most DECODE_MAX_T queries and fewer than the keys,
no gradient, on the CPU) goes to our decode kernel, which reads the cache in place and takes left
padding as one start index per row (`PaddingMask.key_start`), so a batch of prompts of different
lengths never builds a mask.
Shapes: q (B, H, T, D); k, v (B, H_kv, S, D); H a multiple of H_kv; causal masks are
bottom-right aligned (see `reference.causal_mask`).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from minilm.ops import _kernels
from minilm.ops.reference import attention_mask, attention_reference

log = logging.getLogger("minilm.ops")
BACKENDS = ("cuda", "cpu", "torch", "reference")
# what each of our kernels computes; any other call goes to SDPA. The CUDA head dims are
# attention_cuda_supports_head_dim() in csrc/attention/attention_cuda.h; the CPU kernel takes any D.
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                 "cuda": (torch.float16, torch.bfloat16),
                 # shapes only: the kernels' fake implementations (minilm/memory.py plans with them)
                 "meta": (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
CUDA_HEAD_DIMS = (64, 128)
DECODE_MAX_T = 16  # up to this many queries and no gradient: the decode kernel (one row at a time)


def combined_mask(t: int, s: int, causal: bool = True, key_mask: torch.Tensor | None = None,
                  window: int | None = None, device=None) -> torch.Tensor | None:
    """The boolean (B or 1, 1, T, S) mask `attention` builds from its arguments, or None when SDPA can
    mask by itself (no padding, no window that hides a key, T == S). A model calls it once per
    forward and passes the result to every layer as `mask=`."""
    window = window if causal and window is not None and window < s else None  # else it hides nothing
    if key_mask is None and window is None and (not causal or t == s):
        return None
    return attention_mask(t, s, causal, key_mask, device, window)


class PaddingMask:
    """A padded batch's attention mask, made once per forward and read by every layer in the form its
    backend wants: `key_start` (B,) int64 for our decode kernel when every row's padding is on the
    left (row b's keys before key_start[b] are padding; None otherwise), and `dense`, the boolean
    (B, 1, T, S) mask of `combined_mask`, for SDPA and the reference. Each is computed on first use,
    then shared by every layer; a training forward never asks for key_start (nor syncs for it)."""

    def __init__(self, t: int, s: int, key_mask: torch.Tensor, window: int | None = None):
        self.t, self.s, self.key_mask, self.window = t, s, key_mask, window

    @functools.cached_property
    def key_start(self) -> torch.Tensor | None:
        real = self.key_mask.bool()  # (B, S)
        # left padding: once a row's tokens start, they never stop (0 0 1 1 1, not 1 1 0)
        left = bool((real[:, 1:] | ~real[:, :-1]).all())
        return self.s - real.sum(-1) if left else None

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        return combined_mask(self.t, self.s, True, self.key_mask, self.window, self.key_mask.device)


def _dense(mask):
    return mask.dense if isinstance(mask, PaddingMask) else mask


def _torch_sdpa(q, k, v, causal=True, scale=None, key_mask=None, window=None, mask=None):
    mask = _dense(mask)
    gqa = q.shape[1] != k.shape[1]  # H != H_kv: SDPA repeats the k/v heads itself
    if mask is None:  # T queries, S keys (S > T when decoding with a cache)
        mask = combined_mask(q.shape[2], k.shape[2], causal, key_mask, window, q.device)
    if mask is None:
        # the common training case: let SDPA build the (top-left == bottom-right) causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _minilm_kernel(q, k, v, causal=True, scale=None, key_mask=None, window=None, mask=None, devices=("cpu",)):
    """torch.ops.minilm.attention_decode or attention_fwd where one applies (autograd in _kernels.py),
    else SDPA."""
    device = q.device.type
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal and key_mask is None and _decodes(q, k, v, window, mask):
        starts = None if mask is None else mask.key_start
        return torch.ops.minilm.attention_decode(q.contiguous(), k, v, starts, scale)  # k, v read in place
    # our kernels: no mask, no sliding window that hides a key (S > W), a covered dtype (and head
    # dim on CUDA), and no more queries than keys
    supported = (key_mask is None and mask is None and (window is None or not causal or window >= k.shape[2])
                 and device in devices and q.dtype in KERNEL_DTYPES[device]
                 and (device != "cuda" or q.shape[-1] in CUDA_HEAD_DIMS)
                 and not (causal and q.shape[2] > k.shape[2]))  # T > S: some queries would see no key
    if not supported:
        return _torch_sdpa(q, k, v, causal=causal, scale=scale, key_mask=key_mask, window=window, mask=mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernels index raw memory
    return torch.ops.minilm.attention_fwd(q, k, v, causal, scale)[0]  # [1] is lse (B, H, T)


def _decodes(q, k, v, window, mask) -> bool:
    """The decode kernel applies: a KV-cache step (a few queries, and fewer than the keys: a forward
    without a cache, T == S, always takes the training path, so its output is the same bits whether
    or not a gradient is wanted), on the CPU in a dtype it covers, nothing that needs a gradient, no
    window that hides a key, and no padding or padding on the left only."""
    return (q.device.type == "cpu" and q.dtype in KERNEL_DTYPES["cpu"]
            and q.shape[2] <= DECODE_MAX_T and q.shape[2] < k.shape[2]
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and (window is None or window >= k.shape[2]) and k.stride(3) == 1 and v.stride(3) == 1
            and (mask is None or (isinstance(mask, PaddingMask) and mask.key_start is not None)))


def _reference(q, k, v, causal=True, scale=None, key_mask=None, window=None, mask=None):
    return attention_reference(q, k, v, causal, scale, key_mask, window, _dense(mask))


_IMPLS = {
    "cuda": functools.partial(_minilm_kernel, devices=("cuda", "cpu", "meta")),  # CPU tensors: the CPU kernel
    "cpu": functools.partial(_minilm_kernel, devices=("cpu", "meta")),
    "torch": _torch_sdpa,
    "reference": _reference,
}


def _unavailable(name: str) -> str | None:
    """Why backend `name` cannot run here, or None if it can."""
    if name not in _IMPLS:
        return f"{name!r} is not an attention backend; choose one of {', '.join(BACKENDS)}"
    if name in ("cpu", "cuda") and not _kernels.LOADED:
        return (f"backend {name!r} needs minilm's compiled kernels, which are not built "
                f"({_kernels.LOAD_ERROR}); build them with `pip install --no-build-isolation -e .`")
    if name == "cuda" and "cuda" not in _kernels.DEVICES:
        return ("backend 'cuda': minilm._C was built without CUDA kernels (no nvcc or a CPU-only torch "
                "at build time)")
    if name == "cuda" and not torch.cuda.is_available():
        return "backend 'cuda': no CUDA device is available"
    return None


def available_backends() -> list[str]:
    """The backends that can run here, fastest first."""
    return [name for name in BACKENDS if _unavailable(name) is None]


def _choose_backend() -> str:
    forced = os.environ.get("MINILM_OPS", "").strip().lower()
    if forced:
        if (reason := _unavailable(forced)) is not None:
            raise ValueError(f"MINILM_OPS={forced}: {reason} (unset MINILM_OPS to choose automatically)")
        log.info("minilm.ops: attention backend %r (forced by MINILM_OPS)", forced)
        return forced
    if _kernels.LOADED:
        name = available_backends()[0]  # cuda or cpu
        log.info("minilm.ops: attention backend %r (minilm's kernels; SDPA for masked calls)", name)
        return name
    log.warning("minilm.ops: minilm's C++ kernels are not built (%s); attention uses the slow reference "
                "backend. Build them with `pip install --no-build-isolation -e .`, or set MINILM_OPS=torch "
                "for PyTorch's SDPA.", _kernels.LOAD_ERROR)
    return "reference"


BACKEND = _choose_backend()  # once, at import, with its reason logged


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, key_mask: torch.Tensor | None = None,
              backend: str | None = None, window: int | None = None,
              mask: torch.Tensor | PaddingMask | None = None) -> torch.Tensor:
    """Attention of q over k/v; returns (B, H, T, D). See the module docstring for shapes; `window`
    (causal only) keeps each query's last W keys, as Phi-3's sliding window does. `mask`, from
    `combined_mask(T, S, causal, key_mask, window)` or a causal `PaddingMask(T, S, key_mask, window)`,
    replaces those three arguments: a model builds it once per forward instead of once per layer
    (and a call with one goes to SDPA, unless it is a decode step with left padding)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B,H,T,D) and k, v (B,H_kv,S,D) of equal shape; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q heads ({q.shape[1]}) must be a multiple of k/v heads "
                         f"({k.shape[1]}) with equal batch and head dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    # a per-call backend is checked here; the import-time choice already was
    if backend is not None and backend != BACKEND and (reason := _unavailable(backend)) is not None:
        raise ValueError(f"attention: {reason}")
    return _IMPLS[backend or BACKEND](q, k, v, causal=causal, scale=scale, key_mask=key_mask, window=window,
                                      mask=mask)
