"""The reward stage: a scalar head trained on preference pairs with the Bradley-Terry loss (lesson 07).

    minilm reward --init runs/sft-tiny/checkpoint --out-dir runs/reward-tiny          # CPU, ~3 min
    minilm reward --init runs/sft-tiny/checkpoint --lm-weight 1.0 --out-dir runs/hydra-sft

    summary = run_reward(reward_config("tiny", init="runs/sft-tiny/checkpoint"))
    hydra, tok = load_reward_model("runs/reward-tiny/checkpoint")   # minilm/post/reward.py

Bradley-Terry (InstructGPT, arXiv 2203.02155, eq. 1): P(chosen beats rejected) =
sigmoid(r_c - r_r), loss -log sigmoid(r_c - r_r), r the "reward" head at the reply's last token.
With lm_weight > 0 the same trunk pass also trains the LM head on the chosen replies (Hydra-SFT
in one pass, Hydra-RLHF arXiv 2309.00754; minilm/stages/hydra_sft.py is the two-batch version).
  1. load cfg.init into a HydraModel; LoRA when cfg.lora.r > 0 (adapters + head train);
  2. encode the offline pairs of data_prep/instructions.py (train and held-out never overlap);
  3. held-out pair accuracy BEFORE training (a fresh head: about chance);
  4. train with `reward_loss` in minilm/loop.py's run_loop;
  5. measure AFTER, per rejection reason too; the heads go to heads.safetensors.

Deviations: one pair per prompt (InstructGPT ranks K = 4..9 replies); the plain sum
BT + lm_weight x LM, a weighting the Hydra-RLHF text we could read does not fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.config import Validated, from_preset
from minilm.loop import OptimConfig, run_loop
from minilm.post.base_model import LoRAConfig, add_lora
from minilm.post.preferences import make_pair_batch_fn
from minilm.post.reward import evaluate_pairs, load_reward_model, reward_data, reward_loss
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import write_json


@dataclass
class RewardConfig(Validated):
    out_dir: str = "runs/reward-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    max_steps: int = 100            # optimizer steps
    batch_size: int = 32            # pairs per step (64 sequences)
    eval_every: int = 50            # held-out evaluation every N steps
    ckpt_every: int = 50            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=10))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r = 0: full fine-tune; r > 0: LoRA, base frozen
    lm_weight: float = 0.0          # > 0: Hydra-SFT, loss = BT + lm_weight * LM loss on chosen replies
    head: str = "reward"
    n_pairs: int = 3000             # requested train pairs (see data_prep/instructions.py)
    n_eval_pairs: int = 300         # held-out pairs
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 160              # longer pairs are dropped, not cut


REWARD_PRESETS = {
    "tiny": dict(),  # ~1M-param SFT model, 2 CPU cores, ~3 minutes; held-out pair accuracy ~0.58 (lesson 07)
    "small": dict(out_dir="runs/reward-small", init="runs/sft-small/checkpoint", max_steps=1500,
                  batch_size=64, lr=3e-4, n_pairs=20000, eval_every=250, ckpt_every=250),
}
# the fields `minilm reward --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every", "ckpt_every",
         "seed", "device", "dtype", "resume", "lora_r", "lora_alpha", "lm_weight", "n_pairs", "n_eval_pairs", "max_len")


def reward_config(preset: str = "tiny", **overrides) -> RewardConfig:
    return from_preset(RewardConfig, REWARD_PRESETS, preset, "reward", **overrides)


@one_writer
def run_reward(cfg: RewardConfig, on_step=None) -> dict:
    """Train a reward head (Hydra-SFT when cfg.lm_weight > 0); returns held-out accuracy before/after."""
    check_settings(cfg, "reward")   # a rerun into this out_dir must have the same settings
    if cfg.lm_weight < 0:
        raise MinilmError(f"lm_weight must be >= 0 (0: reward loss only), got {cfg.lm_weight}")
    rt = setup_runtime(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)     # the fresh head (and LoRA) start the same on every run and resume
    hydra, tokenizer = load_reward_model(cfg.init, heads=(cfg.head,), device=rt.device)   # 1.
    if cfg.max_len > hydra.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {hydra.config.max_seq_len}")
    if cfg.lora.r > 0:
        add_lora(cfg.lora, hydra.lm)     # freezes the trunk and LM head; the new head stays trainable
    train, heldout, reasons = reward_data(cfg, tokenizer)                                     # 2.
    pad = tokenizer.eot_id
    # batch_fn(step): (2B, T) ids, B chosen rows then their B rejected twins; fixed by (seed, step)
    batch_fn = make_pair_batch_fn(train, cfg.batch_size, cfg.seed, pad, cfg.max_len)

    # every held-out pair once; run_loop calls this under no_grad in eval mode
    def eval_fn(model) -> dict:
        return evaluate_pairs(model, heldout, pad, cfg.max_len, cfg.head)

    hydra.eval()
    before = evaluate_pairs(hydra, heldout, pad, cfg.max_len, cfg.head, reasons)             # 3.

    # BT on the head's score at each reply's last token, r_c - r_r over (B,) pairs (+ the LM term)
    def loss_fn(model, batch):
        return reward_loss(model, batch, cfg.lm_weight, cfg.head)

    def save_fn(ckpt_dir, train_state, meta):
        # the LM as a plain checkpoint any stage can load; the heads beside it as heads.safetensors
        save_checkpoint(ckpt_dir, hydra.lm, tokenizer, train_state,
                        {**meta, "heads": list(hydra.heads), "lm_weight": cfg.lm_weight, "before": before},
                        extra={"heads": hydra.heads.state_dict()})

    summary = run_loop(cfg, hydra, batch_fn, loss_fn, eval_fn, save_fn, tokenizer,            # 4.
                       stage="reward", rt=rt, on_step=on_step)
    hydra.eval()
    after = evaluate_pairs(hydra, heldout, pad, cfg.max_len, cfg.head, reasons)              # 5.
    result = {**summary, "before": before, "after": after, "n_train_pairs": len(train),
              "n_heldout_pairs": len(heldout)}
    write_json(Path(cfg.out_dir) / "eval.json", result)
    return result
