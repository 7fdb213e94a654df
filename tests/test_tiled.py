"""The Python flash-attention (minilm/ops/tiled.py) against the naive reference (lesson 04)."""

import pytest
import torch

from minilm.ops.reference import attention_reference
from minilm.ops.tiled import flash_backward, flash_forward

pytestmark = pytest.mark.lesson_04


@pytest.mark.parametrize("t, s, h, h_kv, causal", [
    (37, 37, 4, 4, True), (37, 37, 4, 2, False), (1, 50, 4, 1, True), (20, 70, 2, 1, True),
    (64, 64, 2, 2, True), (5, 5, 2, 2, False),
])
def test_tiled_forward_and_backward_equal_the_reference(t, s, h, h_kv, causal):
    torch.manual_seed(0)
    q = torch.randn(2, h, t, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, h_kv, s, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, h_kv, s, 16, dtype=torch.float64, requires_grad=True)
    ref = attention_reference(q, k, v, causal=causal)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    # small tiles, not dividing T or S, so every edge case of the tiling is exercised
    out, lse = flash_forward(q.detach(), k.detach(), v.detach(), causal, block_q=8, block_k=16)
    torch.testing.assert_close(out, ref.detach())
    scores = q @ k.repeat_interleave(h // h_kv, 1).transpose(-2, -1) / 4
    if causal:
        i, j = torch.arange(t)[:, None], torch.arange(s)[None, :]
        scores = scores.masked_fill(j > i + (s - t), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach())
    grads = flash_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal, block_q=8, block_k=16)
    for ours, expected in zip(grads, ref_grads):
        torch.testing.assert_close(ours, expected)
