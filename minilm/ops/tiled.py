"""Flash attention in plain PyTorch: the algorithm of csrc/attention/, one readable tile at a time.

This file is the bridge between `reference.attention_reference` (one big score matrix) and the
C++/CUDA kernels (tiles, online softmax, recomputation). It computes the same numbers as the
reference while holding only a (block_q, block_k) tile of scores at a time (Dao et al. 2022,
FlashAttention, Algorithm 1; Dao 2023, FlashAttention-2, section 3.1 for the loop order and the
saved logsumexp). It is slow - Python loops over tiles - and exists to be read and tested; the
kernels in csrc/ are the same loops compiled.

Forward, for one query tile Q_i against key tiles K_j, V_j (scores S = Q_i K_j^T * scale):
    m_new = max(m, rowmax(S))                      running row maximum
    P     = exp(S - m_new)                         this tile's unnormalised probabilities
    l     = l * exp(m - m_new) + rowsum(P)         running row sum, rescaled to the new maximum
    O     = O * exp(m - m_new) + P V_j             running output, rescaled the same way
then O / l is the softmax-weighted output and lse = m + log(l) is all the backward needs.

Backward, recomputing P = exp(S - lse) tile by tile instead of storing it:
    Dlt = rowsum(dO * O)                           (= rowsum(P * dP), one number per query)
    dV += P^T dO;   dP = dO V^T;   dS = P * (dP - Dlt);   dQ += dS K * scale;   dK += dS^T Q * scale
"""

from __future__ import annotations

import math

import torch


def _tile_mask(i0, i1, j0, j1, t, s, causal, device):
    """Causal (bottom-right aligned) mask of one tile, or None if the tile is fully visible."""
    if not causal or j1 - 1 <= i0 + (s - t):  # the tile's last key is visible to its first query
        return None
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    return j <= i + (s - t)


def flash_forward(q, k, v, causal=True, scale=None, block_q=64, block_k=64):
    """Tiled attention forward. q (B,H,T,D); k, v (B,H_kv,S,D). Returns out (B,H,T,D), lse (B,H,T)."""
    b, h, t, d = q.shape
    s, group = k.shape[2], h // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 (fp64 for fp64 inputs)
    out = torch.empty(b, h, t, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, t, dtype=acc, device=q.device)  # saved for the backward
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # readability only
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        qi = q[:, :, i0:i1].to(acc)  # (B, H, bq, D)
        m = torch.full((b, h, i1 - i0), float("-inf"), dtype=acc, device=q.device)  # running row max
        l = torch.zeros(b, h, i1 - i0, dtype=acc, device=q.device)  # running row sum of exp
        o = torch.zeros(b, h, i1 - i0, d, dtype=acc, device=q.device)  # running unnormalised output
        last_key = s if not causal else min(s, i1 + (s - t))  # tiles past this are fully masked
        for j0 in range(0, last_key, block_k):
            j1 = min(j0 + block_k, s)
            scores = qi @ k[:, :, j0:j1].to(acc).transpose(-2, -1) * scale       # (B,H,bq,bk)
            mask = _tile_mask(i0, i1, j0, j1, t, s, causal, q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1))
            p = torch.exp(scores - m_new[..., None])  # (B,H,bq,bk), masked entries 0
            correction = torch.exp(m - m_new)  # exp(-inf) = 0 on the first tile
            l = l * correction + p.sum(-1)
            o = o * correction[..., None] + p @ v[:, :, j0:j1].to(acc)
            m = m_new
        out[:, :, i0:i1] = (o / l[..., None]).to(q.dtype)  # normalise once, at the end
        lse[:, :, i0:i1] = m + torch.log(l)  # log of the softmax denominator
    return out, lse


def flash_backward(dout, q, k, v, out, lse, causal=True, scale=None, block_q=64, block_k=64):
    """Tiled attention backward by recomputation. Returns dq, dk, dv in the input shapes."""
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = lse.dtype
    kr, vr = k.repeat_interleave(group, dim=1).to(acc), v.repeat_interleave(group, dim=1).to(acc)
    dq = torch.zeros(b, h, t, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B,H,T)
    for j0 in range(0, s, block_k):  # FlashAttention-2's backward: key tiles outside
        j1 = min(j0 + block_k, s)
        kj, vj = kr[:, :, j0:j1], vr[:, :, j0:j1]  # (B,H,bk,D) each
        first_query = 0 if not causal else max(0, j0 - (s - t))  # earlier queries cannot see tile j
        for i0 in range(first_query - first_query % block_q, t, block_q):  # from that query's tile
            i1 = min(i0 + block_q, t)
            qi, doi = q[:, :, i0:i1].to(acc), dout[:, :, i0:i1].to(acc)
            scores = qi @ kj.transpose(-2, -1) * scale
            mask = _tile_mask(i0, i1, j0, j1, t, s, causal, q.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            p = torch.exp(scores - lse[:, :, i0:i1, None])                     # (B,H,bq,bk)
            dv[:, :, j0:j1] += p.transpose(-2, -1) @ doi
            dp = doi @ vj.transpose(-2, -1)  # (B,H,bq,bk)
            ds = p * (dp - delta[:, :, i0:i1, None])  # the softmax's backward, row by row
            dq[:, :, i0:i1] += ds @ kj * scale
            dk[:, :, j0:j1] += ds.transpose(-2, -1) @ qi * scale
    # the query heads of a group share one k/v head: their gradients add up
    dk = dk.view(b, h_kv, group, s, d).sum(2)
    dv = dv.view(b, h_kv, group, s, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
