"""minilm's decode kernel (csrc/attention/attention_decode_cpu.cpp) against the definition.

    pytest -m lesson_04 tests/test_attention_decode.py -q

A KV-cache step: T = 1 to a few queries against S cached keys, read in place from a strided cache,
with left padding as one start index per row. Checked against minilm/ops/reference.py in float64
(the specialised head dims 16-128 and the plain loop for 24 and 40), float32 and bfloat16; the
routing in `ops.attention` (decode steps go to it and never build the dense mask, anything that
needs a gradient or has right padding does not); the TORCH_CHECK messages; and generation, where a
row that stops early must not change the others. Skipped when minilm._C is not built.
"""

import importlib

import pytest
import torch
from conftest import tiny_config

from minilm.generate import generate
from minilm.model import Phi3
from minilm.ops import PaddingMask, _kernels, attention
from minilm.ops.reference import attention_reference

pytestmark = [pytest.mark.lesson_04, pytest.mark.skipif(
    not _kernels.LOADED, reason=f"minilm._C is not built ({_kernels.LOAD_ERROR})")]
attention_module = importlib.import_module("minilm.ops.attention")


def cache_step(b, h, h_kv, t, s, d, dtype=torch.float64, room=7, seed=0):
    """q (B, H, T, D) and k, v (B, H_kv, S, D) as views of a cache with `room` more positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, dtype=dtype, generator=g)
    k_cache = torch.randn(b, h_kv, s + room, d, dtype=dtype, generator=g)
    v_cache = torch.randn(b, h_kv, s + room, d, dtype=dtype, generator=g)
    return q, k_cache[:, :, :s], v_cache[:, :, :s]


def reference(q, k, v, key_start):
    key_mask = torch.arange(k.shape[2])[None, :] >= key_start[:, None]  # (B, S), False on padding
    return attention_reference(q.double(), k.double(), v.double(), causal=True, key_mask=key_mask)


@pytest.mark.parametrize("h, h_kv, t, s, d", [
    (4, 2, 1, 37, 32), (4, 1, 3, 40, 64), (2, 2, 5, 70, 128), (6, 3, 1, 19, 16),
    (4, 2, 2, 33, 24), (2, 1, 4, 4, 40), (1, 1, 1, 1, 32)])
def test_float64_equals_the_reference(h, h_kv, t, s, d):
    q, k, v = cache_step(3, h, h_kv, t, s, d)
    key_start = torch.tensor([0, s // 2, s])  # no padding, half, and every key padding
    out = torch.ops.minilm.attention_decode(q, k, v, key_start, d ** -0.5)
    torch.testing.assert_close(out, reference(q, k, v, key_start), atol=1e-12, rtol=1e-12)
    no_padding = torch.ops.minilm.attention_decode(q, k, v, None, d ** -0.5)
    torch.testing.assert_close(no_padding, reference(q, k, v, torch.zeros(3, dtype=torch.long)))


def test_a_row_of_only_padding_sees_every_key():
    """A padding query sees no key; like the reference it then sees all of them (finite, ignored)."""
    q, k, v = cache_step(1, 2, 1, 1, 6, 16)
    out = torch.ops.minilm.attention_decode(q, k, v, torch.tensor([6]), 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=False, scale=0.25))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_float32_and_bfloat16_accumulate_in_float(dtype, tol):
    q, k, v = cache_step(2, 4, 2, 1, 150, 64, dtype=dtype)
    key_start = torch.tensor([3, 0])
    out = torch.ops.minilm.attention_decode(q, k, v, key_start, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, key_start), atol=tol, rtol=tol)


def test_decode_steps_use_the_kernel_and_never_build_the_dense_mask():
    q, k, v = cache_step(2, 4, 2, 1, 9, 32, dtype=torch.float32)
    key_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])  # row 0 left-padded by 3
    mask = PaddingMask(1, 9, key_mask)
    assert mask.key_start.tolist() == [3, 0]
    with torch.inference_mode():
        out = attention(q, k, v, mask=mask, backend="cpu")
    assert "dense" not in vars(mask)  # the cached property was never computed
    torch.testing.assert_close(out, attention_reference(q, k, v, key_mask=key_mask))


def test_right_padding_gradients_long_queries_and_no_cache_go_elsewhere():
    q, k, v = cache_step(2, 4, 2, 1, 9, 32, dtype=torch.float32)
    right = PaddingMask(1, 9, torch.tensor([[1] * 7 + [0, 0], [1] * 9]))
    assert right.key_start is None  # not left padding: only the dense mask describes it
    torch.testing.assert_close(attention(q, k, v, mask=right, backend="cpu"),
                               attention_reference(q, k, v, key_mask=right.key_mask))
    assert "dense" in vars(right)
    q.requires_grad_()  # a gradient is wanted: SDPA, which has a backward
    attention(q, k, v, mask=PaddingMask(1, 9, torch.ones(2, 9)), backend="cpu").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    long_q = torch.randn(2, 4, attention_module.DECODE_MAX_T + 1, 32)
    k2, v2 = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    assert not attention_module._decodes(long_q, k2, v2, None, None)
    # no cache (T == S): the training path whatever the grad mode, so outputs never depend on it
    short_q, k3, v3 = torch.randn(2, 4, 5, 32), torch.randn(2, 2, 5, 32), torch.randn(2, 2, 5, 32)
    assert not attention_module._decodes(short_q, k3, v3, None, None)
    with torch.no_grad():
        without_grad = attention(short_q, k3, v3, backend="cpu")
    assert torch.equal(without_grad, attention(short_q.requires_grad_(), k3, v3, backend="cpu").detach())


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v, s: (q, k, v, s.int()), "key_start must be a contiguous int64"),
    (lambda q, k, v, s: (q, k, v, s[:1]), r"key_start must be .* shape \(B,\) = \(2,\)"),
    (lambda q, k, v, s: (q, k.transpose(2, 3), v, s), "head dim must be contiguous"),
    (lambda q, k, v, s: (q.transpose(1, 2), k, v, s), "q must be contiguous"),
    (lambda q, k, v, s: (q.half(), k.half(), v.half(), s), "dtype must be float32, float64 or bfloat16"),
    (lambda q, k, v, s: (q, k, v[:, :, :3], s), "k and v must have the same shape"),
    (lambda q, k, v, s: (q[:, :3].contiguous(), k, v, s), "must be a multiple of k/v heads"),
    (lambda q, k, v, s: (q, k[:, :, :1], v[:, :, :1], s), "must be the last of the S"),
])
def test_bad_arguments_are_explained(change, message):
    q, k, v = cache_step(2, 4, 2, 2, 8, 16, dtype=torch.float32)
    q, k, v, starts = change(q, k, v, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.minilm.attention_decode(q, k, v, starts, 0.25)


def test_a_row_that_stops_early_leaves_the_others_unchanged():
    """A finished row keeps attending (its outputs are thrown away) so the batch stays left-padded."""
    torch.manual_seed(0)
    model = Phi3(tiny_config()).eval()
    prompts = [[11, 12, 13, 14, 15], [16, 17], [18, 19, 20]]
    first = generate(model, [prompts[1]], max_new_tokens=10, temperature=0).responses()[0]
    stop = first[1]  # row 1 stops after two tokens
    batch = generate(model, prompts, max_new_tokens=10, temperature=0, stop_tokens=[stop])
    alone = [generate(model, [p], max_new_tokens=10, temperature=0, stop_tokens=[stop]) for p in prompts]
    assert batch.responses() == [a.responses()[0] for a in alone]
    for i, a in enumerate(alone):  # the same log-probs, up to float32 summation order
        got = batch.logprobs[i][batch.gen_mask[i].bool()]
        torch.testing.assert_close(got, a.logprobs[0][a.gen_mask[0].bool()], atol=1e-5, rtol=1e-5)
