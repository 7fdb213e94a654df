"""Task 05 (lesson 08): generalized advantage estimation over generated tokens.

Write the body of `gae` below, then check it with

    pytest -m task_05

which compares it with minilm's own `gae` (minilm/post/ppo.py) on a row computed by hand and on
random rollouts whose prompts and replies have different lengths.
"""

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, (B, T) each, over the generated tokens of each row.

    rewards, values: (B, T) floats; mask: (B, T) of 0/1 (bool, int or float), 1 on the
    generated tokens, which are contiguous in each row (prompt before them, padding after).
    With m the mask and V the values with V = 0 wherever m = 0, going backwards in t:

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (A_T = V_T = 0 past the end)
        R_t     = A_t + V_t

    Both outputs are 0 where m = 0, and neither carries a gradient (values may require grad:
    advantages are targets, not something to differentiate through).
    """
    raise NotImplementedError("task 05: write the backward recursion (see the docstring), then run pytest -m task_05")
