"""Task 03 (lesson 04): the online softmax, the heart of flash attention.

Write the body of `online_softmax` below, then check it with

    pytest -m task_03

which compares it with `torch.softmax` on random rows, on rows whose exponentials overflow and on
rows whose first blocks are all masked (-inf). `flash_forward()` in minilm/ops/tiled.py does the
same per tile, with an output accumulator beside the sum.
"""

import torch


def online_softmax(x: torch.Tensor, block: int = 4) -> torch.Tensor:
    """Softmax over the last dimension of x (..., N), reading x in one streaming pass of blocks.

    Pass 1: visit the column blocks x[..., j:j + block] in order, keeping per row only
        m  the largest entry seen so far (start at -inf)
        l  the sum of exp(entry - m) over the entries seen so far (start at 0)
    When a block raises the maximum from m to m_new, the old sum was taken relative to m: rescale
    it by exp(m - m_new) before adding the block's exp(x_block - m_new).
    Pass 2: return exp(x - m) / l (m and l broadcast over the last dimension).

    Entries of -inf are masked keys: their probability is 0. A row may begin with whole blocks
    of -inf (then m is still -inf after them: mind exp(-inf - -inf), which is NaN), but every row
    has at least one finite entry. Never compute exp(x) without subtracting a maximum: x may hold
    numbers like 1000.
    """
    raise NotImplementedError("task 03: stream over the blocks (see the docstring), then run pytest -m task_03")
