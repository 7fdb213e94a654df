"""Reward models: a scalar head trained on preference pairs with the Bradley-Terry loss.

    minilm reward --init runs/sft-tiny/checkpoint --out-dir runs/reward-tiny          # CPU, ~3 min
    minilm reward --init runs/sft-tiny/checkpoint --lm-weight 1.0 --out-dir runs/hydra-sft

    from minilm.stages.reward import reward_config, run_reward
    from minilm.post.reward import load_reward_model
    summary = run_reward(reward_config("tiny", init="runs/sft-tiny/checkpoint"))
    hydra, tok = load_reward_model("runs/reward-tiny/checkpoint")      # HydraModel + tokenizer

Bradley-Terry (InstructGPT, Ouyang et al. 2022, eq. 1; the reward model Hydra-RLHF builds on):
P(chosen beats rejected) = sigmoid(r(x, y_c) - r(x, y_r)), so the loss is -log sigmoid(r_c - r_r),
where r is the "reward" head's value at the reply's last token (minilm/post/heads.py).

Hydra-SFT (Hydra-RLHF, arXiv 2309.00754; ../shared/papers/hydra_rlhf.md): with lm_weight > 0
the same model also keeps its LM head trained, loss = BT + lm_weight * LM loss, both from ONE
trunk pass over the pair batch. The LM loss is on the chosen replies only (the SFT data of a
comparison set is its preferred answers). Our note on the paper leaves the exact weighting and
batch composition "to check", so we do not claim the paper's numbers: we use the plain sum
(lm_weight = 1.0) and expose the weight, because both losses are per-pair/per-token means
of similar size (0.69 nats for BT at the start, a few nats per token for the LM loss). With
lm_weight = 0 the trunk is free to forget language modelling; `eval_lm_loss` shows how much.

  1. load cfg.init (an SFT or pretrained checkpoint) into a HydraModel; LoRA when cfg.lora_r > 0
     (adapters + head trained, base frozen);
  2. encode the offline pairs of data_prep/instructions.py (train and held-out never overlap);
  3. measure held-out pair accuracy BEFORE training (a fresh head: ~chance);
  4. train with `reward_loss` in the shared loop (minilm/post/loop.py);
  5. measure AFTER, per rejection reason too; the heads go to heads.safetensors in the checkpoint.
Deviation: InstructGPT compares K=4..9 replies per prompt; we use one pair per prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.loop import run_loop
from minilm.post.base_model import PostConfig, add_lora, from_preset
from minilm.post.preferences import make_pair_batch_fn
from minilm.post.reward import evaluate_pairs, load_reward_model, reward_data, reward_loss
from minilm.runtime import setup_runtime


@dataclass
class RewardConfig(PostConfig):
    out_dir: str = "runs/reward-tiny"
    init: str = "runs/sft-tiny/checkpoint"
    max_steps: int = 100
    batch_size: int = 32            # pairs per step (64 sequences)
    lr: float = 2e-3
    warmup_steps: int = 10
    eval_every: int = 50
    ckpt_every: int = 50
    lm_weight: float = 0.0          # > 0: Hydra-SFT, loss = BT + lm_weight * LM loss on chosen replies
    head: str = "reward"
    n_pairs: int = 3000             # requested train pairs (see data_prep/instructions.py)
    n_eval_pairs: int = 300         # held-out pairs
    data_seed: int = 0
    max_len: int = 160              # longer pairs are dropped, not cut


REWARD_PRESETS = {
    "tiny": dict(),  # ~1M-param SFT model, 2 CPU cores, ~3 minutes; held-out accuracy ~0.7
    "small": dict(out_dir="runs/reward-small", init="runs/sft-small/checkpoint", max_steps=1500,
                  batch_size=64, lr=3e-4, n_pairs=20000, eval_every=250, ckpt_every=250),
}
# the fields `minilm reward --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every", "ckpt_every",
         "seed", "device", "resume", "lora_r", "lora_alpha", "lm_weight", "n_pairs", "n_eval_pairs", "max_len")


def reward_config(preset: str = "tiny", **overrides) -> RewardConfig:
    return from_preset(RewardConfig, REWARD_PRESETS, preset, "reward", **overrides)


def run_reward(cfg: RewardConfig, on_step=None) -> dict:
    """Train a reward head (Hydra-SFT when cfg.lm_weight > 0); returns held-out accuracy before/after."""
    if cfg.lm_weight < 0:
        raise MinilmError(f"lm_weight must be >= 0 (0: reward loss only), got {cfg.lm_weight}")
    rt = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)     # the fresh head (and LoRA) start the same on every run and resume
    hydra, tokenizer = load_reward_model(cfg.init, heads=(cfg.head,), device=rt.device)   # 1.
    if cfg.max_len > hydra.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {hydra.config.max_seq_len}")
    if cfg.lora_r > 0:
        add_lora(cfg, hydra.lm)     # freezes the trunk and LM head; the new head stays trainable
    train, heldout, reasons = reward_data(cfg, tokenizer)                                     # 2.
    pad = tokenizer.eot_id
    batch_fn = make_pair_batch_fn(train, cfg.batch_size, cfg.seed, pad, cfg.max_len)

    def eval_fn(model) -> dict:
        return evaluate_pairs(model, heldout, pad, cfg.max_len, cfg.head)

    hydra.eval()
    before = evaluate_pairs(hydra, heldout, pad, cfg.max_len, cfg.head, reasons)             # 3.

    def loss_fn(model, batch):
        return reward_loss(model, batch, cfg.lm_weight, cfg.head)

    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, hydra.lm, tokenizer, train_state,
                        {**meta, "heads": list(hydra.heads), "lm_weight": cfg.lm_weight, "before": before},
                        extra={"heads": hydra.heads.state_dict()})

    summary = run_loop(cfg, hydra, batch_fn, loss_fn, eval_fn, save_fn, tokenizer,            # 4.
                       stage="reward", rt=rt, on_step=on_step)
    hydra.eval()
    after = evaluate_pairs(hydra, heldout, pad, cfg.max_len, cfg.head, reasons)              # 5.
    result = {**summary, "before": before, "after": after, "n_train_pairs": len(train),
              "n_heldout_pairs": len(heldout)}
    Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2))
    return result
