"""Reward models: a scalar head trained on preference pairs with the Bradley-Terry loss.

    from minilm.post.reward import load_reward_model, reward_loss
    loss, metrics = reward_loss(hydra, batch, lm_weight=1.0)           # batch from pair_batch()
    hydra, tok = load_reward_model("runs/reward-tiny/checkpoint")      # HydraModel + tokenizer
    minilm reward --init runs/sft-tiny/checkpoint --out-dir runs/reward-tiny   # the stage: minilm/stages/reward.py

Bradley-Terry (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, eq. 1; the reward model
Hydra-RLHF builds on): P(chosen beats rejected) = sigmoid(r(x, y_c) - r(x, y_r)), so the loss is
-log sigmoid(r_c - r_r), where r is the "reward" head's value at the reply's last token
(minilm/post/heads.py).

Hydra-SFT (Hydra-RLHF, arXiv 2309.00754): with lm_weight > 0 the same model also keeps its LM
head trained, loss = BT + lm_weight * LM loss, both from ONE trunk pass over the pair batch; the
LM loss is on the chosen replies only. `hydra_sft_loss` is the variant with a separate SFT batch,
loss = lm_weight * LM + rm_weight * BT. Deviations: our default is the plain sum (both weights 1);
the paper's launch scripts weight the reward term 0.1 (lesson 08 compares the two). InstructGPT
compares K=4..9 replies per prompt; we use one pair per prompt.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from data_prep.instructions import preference_pairs
from minilm.checkpoint import load_checkpoint
from minilm.lora import adapter_names, merge_and_unload
from minilm.post.heads import HydraModel, last_token_index
from minilm.post.preferences import encode_pairs, pair_batches


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean -log sigmoid(chosen - rejected), accuracy) for scores (B,) of both sides of B pairs.

    accuracy is the fraction of pairs scored the right way round; a tie counts 1/2.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} scores "
                         f"must have the same shape (one score per pair side)")
    diff = chosen.float() - rejected.float()          # (B,) r_c - r_r, in fp32 for logsigmoid
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        accuracy = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return loss, accuracy


def pair_scores(hydra, batch: dict, head: str = "reward", lm_weight: float = 0.0):
    """(chosen scores (B,), rejected scores (B,), LM loss or None) from ONE trunk pass.

    batch is `pair_batch`'s (2B, T) layout. With lm_weight > 0 the same pass also yields the LM
    loss on the chosen replies (Hydra-SFT); the rejected replies get no LM loss: we do not want
    the model to learn to write them.
    """
    tokens, mask = batch["tokens"], batch["attention_mask"]
    b = tokens.shape[0] // 2                 # rows [:b] chosen, [b:] rejected
    if lm_weight > 0:
        targets = batch["targets"].clone()
        targets[b:] = -100                   # ignore_index: no LM loss on the rejected replies
        _, lm_loss, values = hydra(tokens, mask, targets)
        scores = values[head].gather(1, last_token_index(mask)[:, None]).squeeze(1)   # (2B,) at the last real token
    else:
        lm_loss, scores = None, hydra.score(tokens, mask, head)
    return scores[:b], scores[b:], lm_loss


def reward_loss(hydra, batch: dict, lm_weight: float = 0.0, head: str = "reward"):
    """Bradley-Terry loss (+ lm_weight * LM loss on chosen replies: Hydra-SFT) and its metrics."""
    chosen, rejected, lm_loss = pair_scores(hydra, batch, head, lm_weight)
    bt, accuracy = bradley_terry_loss(chosen, rejected)
    metrics = {"bt_loss": bt.item(), "accuracy": accuracy.item(),
               "margin": (chosen - rejected).mean().item()}
    if lm_loss is None:
        return bt, metrics
    metrics["lm_loss"] = lm_loss.item()
    return bt + lm_weight * lm_loss, metrics


@torch.no_grad()
def evaluate_pairs(hydra, encoded: list[tuple], pad_id: int, max_len: int, head: str = "reward",
                   reasons: list[str] | None = None) -> dict:
    """Held-out BT loss, accuracy, mean margin, LM loss on chosen replies; accuracy per reason."""
    device = next(hydra.parameters()).device
    chosen, rejected, lm_losses = [], [], []
    for batch in pair_batches(encoded, pad_id, max_len):
        batch = {k: v.to(device) for k, v in batch.items()}
        c, r, lm = pair_scores(hydra, batch, head, lm_weight=1.0)
        chosen.append(c), rejected.append(r), lm_losses.append(lm.item() * len(c))
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    bt, accuracy = bradley_terry_loss(chosen, rejected)
    result = {"eval_accuracy": accuracy.item(), "eval_bt_loss": bt.item(),
              "eval_margin": (chosen - rejected).mean().item(), "eval_lm_loss": sum(lm_losses) / len(chosen)}
    if reasons is not None:
        right = defaultdict(list)
        for reason, c, r in zip(reasons, chosen.tolist(), rejected.tolist()):
            right[reason].append(1.0 if c > r else 0.5 if c == r else 0.0)
        result["by_reason"] = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    return result


def load_reward_model(directory, heads=("reward",), device="cpu"):
    """(HydraModel, tokenizer) from a checkpoint; heads saved in it (heads.safetensors) are loaded."""
    ck = load_checkpoint(directory, device=device)
    if adapter_names(ck.model):  # e.g. an SFT-with-LoRA checkpoint: its adapters become the base
        merge_and_unload(ck.model).requires_grad_(True)
    saved = ck.extra.get("heads", {})
    names = tuple(dict.fromkeys([*heads, *(k.split(".")[0] for k in saved)]))   # asked + saved, in order
    hydra = HydraModel(ck.model, heads=names)
    if saved:
        hydra.heads.load_state_dict(saved, strict=False)
    return hydra, ck.tokenizer


def reward_data(cfg, tokenizer) -> tuple[list, list, list[str]]:
    """(train encoded pairs, held-out encoded pairs, held-out rejection reasons)."""
    train, _ = encode_pairs(tokenizer, preference_pairs(cfg.n_pairs, cfg.data_seed, split="train"),
                            cfg.max_len)
    heldout, kept = encode_pairs(tokenizer, preference_pairs(cfg.n_eval_pairs, cfg.data_seed + 1,
                                                             split="heldout"), cfg.max_len)
    return train, heldout, [p["reason"] for p in kept]


def hydra_sft_loss(hydra, batch: dict, lm_weight: float = 1.0, rm_weight: float = 1.0, head: str = "reward"):
    """lm_weight * LM loss on batch["sft"] (a `collate` batch) + rm_weight * BT loss on batch["pairs"]
    (a `pair_batch`), and metrics (both losses unweighted)."""
    sft = batch["sft"]
    _, lm_loss, _ = hydra(sft["tokens"], sft["attention_mask"], sft["targets"])   # trunk pass 1: the chats
    bt, metrics = reward_loss(hydra, batch["pairs"], lm_weight=0.0, head=head)     # trunk pass 2: the pairs
    metrics["lm_loss"] = lm_loss.item()
    return lm_weight * lm_loss + rm_weight * bt, metrics
