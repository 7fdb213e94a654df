"""Hydra-SFT: one model trained on SFT data and comparison data together (LM head + reward head).

    from minilm.stages.hydra_sft import hydra_sft_config, run_hydra_sft

    result = run_hydra_sft(hydra_sft_config("tiny", init="runs/base-tiny/checkpoint"))
    table = compare_reward_models(hydra_sft_config("tiny", init="runs/sft-tiny/checkpoint"))

Hydra-RLHF (Santacroce et al. 2023, arXiv 2309.00754; ../shared/papers/hydra_rlhf.md) replaces the
separate SFT model and reward model of RLHF by ONE "Hydra" model: a causal-LM head and a scalar
reward head on the same trunk (minilm/post/heads.py), trained on the SFT data and the comparison
data at once. The PPO variants hydra and jhydra (minilm/post/ppo_models.py) start from it: with
LoRA off it is both the reference policy and the reward model.

One step (run_hydra_sft, in the shared loop of minilm/post/loop.py):
  1. an SFT batch of chat conversations (data_prep/instructions.py) -> LM loss on assistant tokens;
  2. a batch of preference pairs -> Bradley-Terry loss on the reward head (minilm/post/reward.py);
  3. loss = BT + lm_weight * LM, AdamW over the whole Hydra model (or its LoRA + heads).
`compare_reward_models` trains the separate reward model (`run_reward`, lm_weight 0) from the same
init on the same pairs for the same steps and puts both held-out pair accuracies side by side.

Deviations: the paper's loss weighting and batch composition for Hydra-SFT are in its body text,
which we could not read (our sources: the abstract and a verified summary of its tables, where the
paper reports Hydra-SFT's win-rate, 48.50 vs SFT's 48.55 on LLaMA-7B, but not the weighting). We use one SFT batch plus one pair batch per step and the plain sum (lm_weight = 1), two trunk
passes per step because the two batches are different data. `minilm reward --lm-weight 1`
(reward.py) is the one-pass variant that takes its LM loss from the chosen replies instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.loop import run_loop
from minilm.post.base_model import PostConfig, add_lora, from_preset
from minilm.post.oracles import AnswerOracle
from minilm.post.preferences import make_pair_batch_fn
from minilm.post.reward import evaluate_pairs, hydra_sft_loss, load_reward_model, reward_data
from minilm.post.sft import evaluate_chat, make_batch_fn, render_examples
from minilm.runtime import setup_runtime


@dataclass
class HydraSFTConfig(PostConfig):
    out_dir: str = "runs/hydra-sft-tiny"
    init: str = "runs/sft-tiny/checkpoint"
    max_steps: int = 100
    batch_size: int = 32            # preference pairs per step (64 sequences)
    lr: float = 2e-3
    warmup_steps: int = 10
    eval_every: int = 50
    ckpt_every: int = 50
    lm_weight: float = 1.0          # loss = BT + lm_weight * LM (SFT batch)
    head: str = "reward"
    n_pairs: int = 3000             # requested train pairs (see data_prep/instructions.py)
    n_eval_pairs: int = 300         # held-out pairs
    data_seed: int = 0
    max_len: int = 160              # longer pairs and conversations are dropped, not cut
    sft_batch_size: int = 16        # conversations per step, besides batch_size pairs
    sources: str = "man,stdlib,arithmetic,units"  # the SFT conversations (data_prep/instructions.py)
    n_train: int = 4000
    n_eval: int = 100               # held-out prompts judged greedily before/after (chat quality)
    max_new_tokens: int = 32


HYDRA_SFT_PRESETS = {
    "tiny": dict(),  # ~1M-param model, 2 CPU cores, a few minutes
    "ci": dict(max_steps=12, batch_size=8, sft_batch_size=8, n_pairs=200, n_train=400, n_eval_pairs=24,
               n_eval=16, eval_every=12, ckpt_every=12),
    "gpu": dict(max_steps=1000, batch_size=64, n_pairs=20000, n_train=20000),
}
HYDRA_SFT_PRESETS["laptop"] = HYDRA_SFT_PRESETS["tiny"]
# the fields `minilm hydra-sft --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "sft_batch_size", "lr", "warmup_steps",
         "eval_every", "ckpt_every", "seed", "device", "resume", "lora_r", "lora_alpha", "lm_weight",
         "n_pairs", "n_train", "n_eval_pairs", "n_eval", "max_len")


def hydra_sft_config(preset: str = "tiny", **overrides) -> HydraSFTConfig:
    return from_preset(HydraSFTConfig, HYDRA_SFT_PRESETS, preset, "hydra-sft", **overrides)


def _sft_conversations(cfg: HydraSFTConfig):
    from data_prep.instructions import instruction_examples
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = instruction_examples(cfg.n_train, cfg.data_seed, sources, split="train")
    return train, instruction_examples(cfg.n_eval, cfg.data_seed + 1, sources, split="heldout")


def run_hydra_sft(cfg: HydraSFTConfig, on_step=None) -> dict:
    """Train a Hydra-SFT model; returns held-out pair accuracy and chat quality before/after."""
    rt = setup_runtime(cfg.device)
    hydra, tokenizer = load_reward_model(cfg.init, heads=(cfg.head,), device=rt.device)
    if cfg.max_len > hydra.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {hydra.config.max_seq_len}")
    if cfg.lora_r > 0:
        add_lora(cfg, hydra.lm)     # the heads stay trainable
    pad = tokenizer.eot_id
    pairs, heldout_pairs, _ = reward_data(cfg, tokenizer)
    chats, heldout_chats = _sft_conversations(cfg)
    sft_fn = make_batch_fn(render_examples(tokenizer, chats, cfg.max_len), cfg.sft_batch_size, cfg.seed,
                           pad, cfg.max_len)
    pair_fn = make_pair_batch_fn(pairs, cfg.batch_size, cfg.seed, pad, cfg.max_len)
    oracle = AnswerOracle(chats + heldout_chats)

    def evaluate(model) -> dict:
        return {**evaluate_pairs(model, heldout_pairs, pad, cfg.max_len, cfg.head),
                **evaluate_chat(model.lm, tokenizer, heldout_chats, oracle, cfg.max_new_tokens)}

    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, hydra.lm, tokenizer, train_state,
                        {**meta, "heads": list(hydra.heads), "lm_weight": cfg.lm_weight, "before": before},
                        extra={"heads": hydra.heads.state_dict()})

    hydra.eval()
    before = evaluate(hydra)
    summary = run_loop(cfg, hydra, lambda step: {"sft": sft_fn(step), "pairs": pair_fn(step)},
                       lambda model, batch: hydra_sft_loss(model, batch, cfg.lm_weight, cfg.head),
                       lambda model: evaluate_pairs(model, heldout_pairs, pad, cfg.max_len, cfg.head),
                       save_fn, tokenizer, stage="hydra-sft", rt=rt, on_step=on_step)
    hydra.eval()
    result = {**summary, "before": before, "after": evaluate(hydra), "n_pairs": len(pairs),
              "n_heldout_pairs": len(heldout_pairs)}
    Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2))
    return result

