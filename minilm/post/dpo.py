"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): the loss and its pieces.

    loss, metrics = dpo_batch_loss(model, batch, beta=0.1)      # batch from pair_batch(); ref = LoRA off
    minilm dpo --init runs/sft-tiny/checkpoint --out-dir runs/dpo-tiny   # the stage: minilm/stages/dpo.py

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

DPO fits the policy directly to preference pairs: beta * log(pi / ref) plays the part of RLHF's
reward (the "implicit reward"), so no reward model and no sampling are needed during training.
The reference is the SFT model, frozen: a deep copy for a full fine-tune, or, with LoRA, the very
same weights with the adapters switched off (`minilm.lora.lora_disabled`), which costs no memory.
`preferred_rate` and `summarize` turn AnswerOracle's judgements of greedy replies into the
stage's held-out numbers.

Deviations: the reference log-probs are recomputed each step rather than precomputed once (same
numbers, simpler). No label smoothing / conservative DPO; replies are summed over tokens as in
the paper (no length normalisation). sft_weight > 0 adds the NLL of the chosen replies (the DPO +
NLL loss of Iterative RPO, Pang et al. 2024, arXiv 2404.19733), which the DPO paper does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minilm.generate import token_logprobs
from minilm.lora import lora_disabled
from minilm.post.preferences import pair_batches


def sequence_logprobs(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | prefix) over the reply tokens (loss_mask 1), per row: (B,)."""
    logprobs = token_logprobs(model, tokens, attention_mask)          # (B, T)
    return (logprobs * loss_mask.to(logprobs.dtype)).sum(dim=-1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The sigmoid DPO loss over a batch of pairs (all inputs (B,) sequence log-probs).

    metrics: chosen_reward / rejected_reward = mean beta * (log pi - log ref) of each side,
    margin = mean of their difference, accuracy = fraction of pairs whose margin is > 0
    (a tie counts 1/2, so the untrained policy, equal to the reference, scores 0.5).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (it scales the implicit reward), got {beta}")
    chosen_reward = beta * (pi_chosen - ref_chosen.detach())          # (B,)
    rejected_reward = beta * (pi_rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward                          # (B,) 0 while pi == ref
    loss = -F.logsigmoid(margin).mean()                               # log 2 at the start
    with torch.no_grad():
        accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
        metrics = {"chosen_reward": chosen_reward.mean().item(),
                   "rejected_reward": rejected_reward.mean().item(),
                   "margin": margin.mean().item(), "accuracy": accuracy.item()}
    return loss, metrics


def reference_logprobs(model, batch: dict, reference=None) -> torch.Tensor:
    """Reference sequence log-probs (2B,) over the credited tokens, no grad: `reference` if given,
    else `model` with LoRA off."""
    args = (batch["tokens"], batch["attention_mask"], batch.get("credit_mask", batch["loss_mask"]))
    with torch.no_grad():
        if reference is not None:
            return sequence_logprobs(reference, *args)
        with lora_disabled(model):
            return sequence_logprobs(model, *args)


def dpo_batch_loss(model, batch: dict, beta: float = 0.1, reference=None,
                   sft_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO loss of a `pair_batch` (chosen rows, then rejected rows) and its metrics.

    sft_weight > 0 adds the mean NLL per token of the chosen replies (the DPO + NLL loss of
    Iterative RPO, Pang et al. 2024, arXiv 2404.19733): it keeps the chosen replies likely while
    DPO widens the gap.
    """
    b = batch["tokens"].shape[0] // 2        # rows [:b] are chosen, [b:] their rejected twins
    token_lp = token_logprobs(model, batch["tokens"], batch["attention_mask"])         # (2B, T)
    credit, replies = batch.get("credit_mask", batch["loss_mask"]), batch["loss_mask"]
    policy = (token_lp * credit.to(token_lp.dtype)).sum(-1)     # (2B,) the credited tokens (pair_batch)
    ref = reference_logprobs(model, batch, reference)
    loss, metrics = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta)
    metrics["logp_chosen"] = policy[:b].mean().item()     # watch: DPO can lower both sides
    metrics["logp_rejected"] = policy[b:].mean().item()
    if sft_weight > 0:   # the NLL reads the WHOLE chosen reply, whatever the DPO term credits
        nll = -(token_lp[:b] * replies[:b].to(token_lp.dtype)).sum() / replies[:b].sum()   # per token
        metrics["chosen_nll"] = nll.item()
        loss = loss + sft_weight * nll
    return loss, metrics


@torch.no_grad()
def evaluate_dpo(model, encoded: list[tuple], pad_id: int, max_len: int, beta: float, reference=None,
                 step_ends: tuple[int, ...] = ()) -> dict:
    """Held-out DPO loss and implicit-reward metrics, every pair once (credited as in training)."""
    device = next(model.parameters()).device
    policy, ref = [], []
    for batch in pair_batches(encoded, pad_id, max_len, step_ends=step_ends):
        batch = {k: v.to(device) for k, v in batch.items()}
        b = batch["tokens"].shape[0] // 2
        pi = sequence_logprobs(model, batch["tokens"], batch["attention_mask"], batch["credit_mask"])
        rf = reference_logprobs(model, batch, reference)
        policy.append(torch.stack([pi[:b], pi[b:]])), ref.append(torch.stack([rf[:b], rf[b:]]))
    policy, ref = torch.cat(policy, dim=1), torch.cat(ref, dim=1)       # (2, N): chosen, rejected
    loss, metrics = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta)
    # the absolute ranking: does the model itself find the preferred answer more likely?
    ranks = {"eval_policy_ranks_chosen": (policy[0] > policy[1]).float().mean().item(),
             "eval_ref_ranks_chosen": (ref[0] > ref[1]).float().mean().item()}
    return {"eval_loss": loss.item(), **{f"eval_{k}": v for k, v in metrics.items()}, **ranks}


def preferred_rate(new: list[dict], old: list[dict]) -> dict:
    """Head-to-head on the same prompts: how often the new reply's reward beats the old one's."""
    wins = sum(a["reward"] > b["reward"] for a, b in zip(new, old))
    ties = sum(a["reward"] == b["reward"] for a, b in zip(new, old))
    n = max(1, len(new))
    return {"win_rate": wins / n, "tie_rate": ties / n, "preferred_rate": (wins + 0.5 * ties) / n}


def summarize(judged: list[dict], conversations: list[dict] | None = None) -> dict:
    """Mean reward and correct/form/end rates; with the conversations, the reward per kind too."""
    n = max(1, len(judged))
    rate = lambda key: sum(j[key] for j in judged) / n  # noqa: E731
    out = {"reward": rate("reward"), "correct_rate": rate("correct"), "form_rate": rate("in_form"),
           "end_rate": rate("ended")}
    for kind in sorted({c["kind"] for c in conversations or []}):
        rewards = [j["reward"] for j, c in zip(judged, conversations) if c["kind"] == kind]
        out[f"reward_{kind}"] = sum(rewards) / len(rewards)
    return out

