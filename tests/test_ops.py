"""Attention backends against the naive definition in minilm/ops/reference.py."""

import pytest
import torch

from minilm.ops import attention, available_backends, combined_mask
from minilm.ops.reference import attention_reference, causal_mask

pytestmark = pytest.mark.lesson_01


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # two new queries after three cached keys: each sees the cache and itself
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_reference_equals_softmax_formula_for_one_head():
    q, k, v = torch.randn(1, 1, 4, 8, dtype=torch.float64), torch.randn(1, 1, 4, 8, dtype=torch.float64), \
        torch.randn(1, 1, 4, 8, dtype=torch.float64)
    out = attention_reference(q, k, v, causal=False)
    expected = torch.softmax(q[0, 0] @ k[0, 0].T / 8 ** 0.5, dim=-1) @ v[0, 0]
    torch.testing.assert_close(out[0, 0], expected)


def test_grouped_query_heads_share_kv():
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out = attention_reference(q, k, v)
    # query heads 0,1 use k/v head 0; heads 2,3 use k/v head 1
    torch.testing.assert_close(out[:, 1:2], attention_reference(q[:, 1:2], k[:, :1], v[:, :1]))
    torch.testing.assert_close(out[:, 3:4], attention_reference(q[:, 3:4], k[:, 1:], v[:, 1:]))


@pytest.mark.parametrize("t, s, causal", [(7, 7, True), (7, 7, False), (1, 9, True), (3, 9, True)])
def test_torch_backend_matches_reference(t, s, causal):
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
    torch.testing.assert_close(attention(q, k, v, causal=causal, backend="torch"),
                               attention_reference(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


def test_key_mask_hides_padding_in_every_backend():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ref = attention_reference(q, k, v, key_mask=key_mask)
    torch.testing.assert_close(attention(q, k, v, key_mask=key_mask, backend="torch"), ref,
                               atol=1e-5, rtol=1e-5)
    # the real tokens of row 0 see exactly what they would see without the padding
    torch.testing.assert_close(ref[0, :, 2:], attention_reference(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:])[0])
    assert torch.isfinite(ref).all()  # fully masked padding rows do not produce NaN


@pytest.mark.parametrize("t, s, window", [(1, 9, None), (3, 9, 4), (6, 6, None), (6, 6, 2)])
def test_a_prebuilt_mask_gives_exactly_what_the_arguments_give(t, s, window):
    # a model builds combined_mask once per forward and hands it to every layer: same numbers, bit for bit
    q, k, v = torch.randn(2, 4, t, 8), torch.randn(2, 2, s, 8), torch.randn(2, 2, s, 8)
    key_mask = torch.ones(2, s, dtype=torch.long)
    key_mask[0, :3] = 0
    mask = combined_mask(t, s, True, key_mask, window)
    assert mask.shape == (2, 1, t, s) and mask.dtype == torch.bool
    for backend in available_backends():
        assert torch.equal(attention(q, k, v, mask=mask, backend=backend),
                           attention(q, k, v, key_mask=key_mask, window=window, backend=backend)), backend
    # nothing to mask beyond causality at T == S: SDPA's own is_causal does it
    assert combined_mask(s, s, True, None, None) is None and combined_mask(s, s, True, None, s + 1) is None


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"q \(B,H,T,D\)"):
        attention(torch.randn(3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
