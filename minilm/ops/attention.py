"""`minilm.ops.attention`: scaled dot-product attention with grouped-query heads.

One function, several backends, chosen once at import (and forced with the environment variable
`MINILM_OPS`):

    torch      PyTorch's `scaled_dot_product_attention` (fused, fast on CPU and GPU)
    reference  the naive definition in `minilm/ops/reference.py` (for tests and lessons)

Our own C++/CUDA kernels in `csrc/` join this list as the first choice when they are built.
Shapes: q (B, H, T, D); k, v (B, H_kv, S, D); H a multiple of H_kv; causal masks are
bottom-right aligned (see `reference.causal_mask`).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from minilm.ops.reference import attention_mask, attention_reference

log = logging.getLogger("minilm.ops")
BACKENDS = ("torch", "reference")


def _torch_sdpa(q, k, v, causal=True, scale=None, key_mask=None):
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_mask is None and (not causal or t == s):
        # the common training case: let SDPA build the (top-left == bottom-right) causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = attention_mask(t, s, causal, key_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


_IMPLS = {"torch": _torch_sdpa, "reference": attention_reference}


def _choose_backend() -> str:
    forced = os.environ.get("MINILM_OPS", "").strip().lower()
    if forced:
        if forced not in _IMPLS:
            raise ValueError(f"MINILM_OPS={forced!r} is not an available attention backend; "
                             f"choose one of {', '.join(_IMPLS)} (unset it to choose automatically)")
        log.info("minilm.ops: attention backend %r (forced by MINILM_OPS)", forced)
        return forced
    log.info("minilm.ops: attention backend 'torch' (no compiled minilm kernels in this build)")
    return "torch"


BACKEND = _choose_backend()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, key_mask: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Attention of q over k/v; returns (B, H, T, D). See the module docstring for shapes."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B,H,T,D) and k, v (B,H_kv,S,D) of equal shape; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q heads ({q.shape[1]}) must be a multiple of k/v heads "
                         f"({k.shape[1]}) with equal batch and head dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    return _IMPLS[backend or BACKEND](q, k, v, causal=causal, scale=scale, key_mask=key_mask)
