"""Lesson 01's attention by hand: every number that section prints is recomputed here.

Q, K, V are the lesson's three tokens with head dimension 2. The test computes the scores, the
causal mask, the softmax and the weighted sum with plain torch, checks them against
`attention_reference()` and PyTorch's fused attention, and checks that the lesson prints exactly
these rows and no 4-decimal number that is not among them.
"""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minilm.model import apply_rope, rope_tables
from minilm.ops.reference import attention_reference, causal_mask

pytestmark = pytest.mark.lesson_01

LESSON = Path(__file__).resolve().parent.parent / "lessons" / "01_transformer.md"
Q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)  # (T, d) = (3, 2)
K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def _section() -> str:
    """The lesson's text from the by-hand heading to "Now meet Phi-3's layer"."""
    text = LESSON.read_text()
    start, end = text.index("### Attention by hand"), text.index("### Now meet Phi-3's layer")
    return text[start:end]


def _by_hand(q, k, v):
    """The four steps, one line each: scores, mask, softmax, weighted sum."""
    scores = q @ k.T / math.sqrt(q.shape[-1])                                       # (T, T)
    masked = scores.masked_fill(~causal_mask(3, 3), float("-inf"))
    probs = masked.exp() / masked.exp().sum(-1, keepdim=True)                        # row by row
    return scores, masked, probs, probs @ v


def _row(name: str, values) -> str:
    """One row as the lesson prints it: the name in 16 columns, then 4-decimal numbers."""
    return f"{name:16s}" + "   ".join(f"{float(x):6.4f}" for x in values)


def test_the_four_steps_give_the_lessons_matrices():
    scores, _, probs, out = _by_hand(Q, K, V)
    s2 = 1 / math.sqrt(2)
    assert torch.allclose(scores, torch.tensor([[s2, 0, s2], [s2, s2, 2 * s2], [0, 2 * s2, 2 * s2]],
                                               dtype=torch.float64))
    assert probs[0].tolist() == [1.0, 0.0, 0.0] and probs[1].tolist() == [0.5, 0.5, 0.0]
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))       # one unit per query
    assert torch.allclose(out[2], probs[2, 0] * V[0] + probs[2, 1] * V[1] + probs[2, 2] * V[2])


def test_the_by_hand_numbers_equal_minilms_reference_and_pytorchs_fused_attention():
    *_, out = _by_hand(Q, K, V)
    q, k, v = (x.view(1, 1, 3, 2) for x in (Q, K, V))                              # (B, H, T, D)
    assert torch.allclose(attention_reference(q, k, v, causal=True)[0, 0], out, atol=1e-12)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0], out, atol=1e-12)
    assert torch.allclose(torch.softmax(_by_hand(Q, K, V)[1], dim=-1), _by_hand(Q, K, V)[2], atol=1e-12)


def test_the_lesson_prints_every_row_of_every_step():
    text = _section()
    scores, masked, probs, out = _by_hand(Q, K, V)
    for title, matrix in (("S", scores), ("S + M", masked), ("P", probs)):
        assert f"{title:16s} key 0    key 1    key 2" in text, title
        for i in range(3):
            assert _row(f"query {i}", matrix[i]) in text, (title, _row(f"query {i}", matrix[i]))
    for i in range(3):
        assert _row(f"query {i}", out[i]) in text
        line = f"t = {i}    [{Q[i, 0]:.0f}, {Q[i, 1]:.0f}]    [{K[i, 0]:.0f}, {K[i, 1]:.0f}]    "
        assert line + f"[{V[i, 0]:.0f}, {V[i, 1]:.0f}]" in text


def _rope_example():
    """Lesson's RoPE paragraph: d = 2, one pair turning 1 radian per position."""
    cos, sin = rope_tables(2, 3, theta=10000.0)                                     # (3, 2) each

    def rotate(x):                                                                  # (T, d) -> (T, d)
        return apply_rope(x.view(1, 1, 3, 2), cos.double().view(1, 1, 3, 2), sin.double().view(1, 1, 3, 2))[0, 0]

    return cos, sin, _by_hand(rotate(Q), rotate(K), V), rotate(Q)


def test_rope_breaks_the_tie_of_row_one_as_the_lesson_says():
    cos, sin, (scores, _, probs, _), q_rot = _rope_example()
    plain = _by_hand(Q, K, V)[0]
    assert torch.allclose(scores.diagonal(), plain.diagonal())       # same position: score unchanged
    assert scores[1, 0] < plain[1, 0] and probs[1, 1] > probs[1, 0]  # key 0 is one step away
    assert torch.allclose(q_rot[1], torch.tensor([cos[1, 0] - sin[1, 0], cos[1, 0] + sin[1, 0]],
                                                 dtype=torch.float64), atol=1e-7)


def test_every_four_decimal_number_in_the_section_is_recomputed():
    cos, sin, (r_scores, _, r_probs, _), q_rot = _rope_example()
    scores, masked, probs, out = _by_hand(Q, K, V)
    row1, row2 = masked[1].exp(), masked[2].exp()
    computed = [scores, probs, out, row1, row1.sum(), row2, row2.sum(), 1 / row2.sum(), row2 / row2.sum(),
                torch.tensor(math.sqrt(2)), cos[1, 0], sin[1, 0], q_rot[1], r_scores[1, 0], r_probs[1]]
    known = {f"{float(x):.4f}" for t in computed for x in torch.as_tensor(t).flatten()}
    printed = set(re.findall(r"-?\d+\.\d{4}", _section()))
    assert printed, "the by-hand section prints no numbers"
    assert printed <= known, f"printed but not recomputed: {sorted(printed - known)}"
