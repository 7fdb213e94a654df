"""Task 04 (lesson 07): the DPO loss (Rafailov et al. 2023, eq. 7).

Write the body of `dpo_loss` below, then check it with

    pytest -m task_04

which compares it with minilm's own `dpo_loss` (minilm/post/dpo.py): the loss, the metrics and
the gradients, on hand-built and random log-probabilities.
"""

import torch


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The sigmoid DPO loss over a batch of pairs; every input is (B,) summed reply log-probs.

        chosen_reward   = beta * (pi_chosen - ref_chosen)          (B,), the implicit rewards
        rejected_reward = beta * (pi_rejected - ref_rejected)
        margin          = chosen_reward - rejected_reward
        loss            = mean over the batch of -log sigmoid(margin)

    The reference is frozen: no gradient may flow into ref_chosen or ref_rejected. beta <= 0
    raises ValueError. Returns (loss, metrics) with metrics a dict of Python floats:
    "chosen_reward" and "rejected_reward" (batch means), "margin" (batch mean) and "accuracy",
    the fraction of pairs with margin > 0, a tie (margin == 0) counting 1/2.
    Hint: `torch.nn.functional.logsigmoid` is exact where log(sigmoid(.)) underflows.
    """
    raise NotImplementedError("task 04: write the loss (see the docstring), then run pytest -m task_04")
