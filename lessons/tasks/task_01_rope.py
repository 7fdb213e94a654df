"""Task 01 (lesson 01): rotary position embeddings, Phi-3's "rotate half" convention.

Write the body of `apply_rope` below, then check it with

    pytest -m task_01

which compares it with minilm's own `apply_rope` (minilm/model.py) on random heads and on
hand-built vectors. Try it before reading the library's two lines.
"""

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]) of every query or key vector by its angle.

    x: (B, H, T, D), D even; cos, sin: (B, 1, T, D), the cosine and sine of each position's
    angles with the first half of the last dimension repeated in the second half (as
    `rope_tables()` builds them, indexed by position). Returns a tensor shaped and typed like x.

    For one pair (a, b) = (x_i, x_{i+D/2}) turned by angle θ: a' = a cos θ - b sin θ and
    b' = b cos θ + a sin θ. Written with whole halves x1, x2 of x this is
        x * cos + [-x2, x1] * sin
    Hints: `torch.chunk`, `torch.cat`; compute in whatever dtype the product gives, return x.dtype.
    """
    raise NotImplementedError("task 01: rotate the pairs (see the docstring), then run pytest -m task_01")
