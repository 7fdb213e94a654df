"""Pure-PyTorch references for minilm's ops: the definitions every kernel is tested against.

These are written for clarity, not speed: attention materialises the full (T, S) score matrix and
repeats k/v heads for grouped-query attention; the masked FFN computes every neuron and multiplies
the pruned ones by zero. `minilm/ops/attention.py` and `minilm/ops/masking.py` pick a faster backend
for real work; tests compare every backend with the functions here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(t: int, s: int, device=None, window: int | None = None) -> torch.Tensor:
    """(T, S) boolean mask, True where query i may attend to key j.

    Bottom-right aligned: the T queries are the *last* T positions of the S keys, so query i sees
    keys j <= i + (S - T). With T == S this is the usual lower triangle; when decoding with a KV
    cache (T == 1) the one new query sees every cached key. A sliding `window` W keeps only the
    last W of them, the query's own key included: j > i + (S - T) - W.
    """
    i = torch.arange(t, device=device).unsqueeze(1)  # (T, 1) query positions
    j = torch.arange(s, device=device).unsqueeze(0)  # (1, S) key positions
    mask = j <= i + (s - t)
    return mask if window is None else mask & (j > i + (s - t) - window)


def attention_mask(t: int, s: int, causal: bool, key_mask: torch.Tensor | None,
                   device=None, window: int | None = None) -> torch.Tensor | None:
    """Combine causality and key padding into one boolean mask broadcastable to (B, H, T, S).

    key_mask: (B, S) with 1/True for real tokens and 0/False for padding. A query row that would
    see no key at all (a padding position under left padding) is allowed to see every key, so the
    softmax stays finite; its output is garbage by construction and is ignored downstream.
    """
    if not causal and key_mask is None:
        return None
    mask = causal_mask(t, s, device, window) if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    mask = mask.view(1, 1, t, s)  # broadcast over batch and heads
    if key_mask is not None:
        mask = mask & key_mask.bool().view(-1, 1, 1, s)  # (B, 1, T, S)
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # no row of all -inf: no NaN
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None, key_mask: torch.Tensor | None = None,
                        window: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, the definition of attention.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv (query head h uses k/v head
    h // (H / H_kv)); key_mask: optional (B, S); window: see `causal_mask`. `mask`, a boolean
    (B or 1, 1, T, S) built by `attention_mask`, replaces causal, key_mask and window. Returns
    (B, H, T, D).
    """
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(h // h_kv, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(h // h_kv, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is None:
        mask = attention_mask(t, s, causal, key_mask, q.device, window)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in at least float32 (bf16/fp16 inputs), in float64 for float64 inputs (gradcheck)
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # (B, H, T, S)
    return probs.to(q.dtype) @ v  # (B, H, T, D)


def masked_ffn_reference(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x) * mask): the gated-SiLU FFN with neuron j multiplied by mask[j].

    x: (..., D); gate_up_weight: (2F, D), rows gate then up; down_weight: (D, F); mask: (F,).
    Every neuron is computed and the pruned ones are multiplied by zero: the dense baseline the
    kernel (which skips them) must equal. Differentiable in the mask too (straight-through scores).
    """
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)  # (..., F) each
    return F.linear(F.silu(gate) * up * mask.to(x.dtype), down_weight)  # (..., D)


def ffn_compact_reference(gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept neurons' weights, in order: gate+up rows (2K, D) and down columns (D, K)."""
    kept = mask.nonzero().flatten()  # (K,)
    n = down_weight.shape[1]  # F: the up rows start at row F
    return gate_up_weight[torch.cat([kept, kept + n])], down_weight[:, kept]


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over kept rows of logsumexp(logits[i]) - logits[i, targets[i]], in float32 (float64 stays).

    logits (N, V), targets (N,) int64; rows whose target is ignore_index do not count (all ignored: nan,
    as 0 / 0, like F.cross_entropy). This is PyTorch's own fused path, spelled out.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    keep = targets != ignore_index
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,) the targets' logits
    rows = torch.where(keep, logits.logsumexp(dim=1) - picked, torch.zeros_like(picked))
    return rows.sum() / keep.sum()
