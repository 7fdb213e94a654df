"""The Hydra-SFT stage: one model trained on SFT chats and comparison pairs together (lesson 08).

    minilm hydra-sft --init runs/sft-tiny/checkpoint --out-dir runs/hydra-sft-tiny
    result = run_hydra_sft(hydra_sft_config("tiny", init="runs/sft-tiny/checkpoint"))
    python benchmarks/hydra_vs_reward.py --init runs/sft-tiny/checkpoint    # vs a separate RM

Hydra-RLHF (Santacroce et al. 2023, arXiv 2309.00754) replaces the separate SFT and reward models
of RLHF by ONE model: a causal-LM head and a scalar reward head on the same trunk
(minilm/post/heads.py), trained on both kinds of data at once. The PPO variants hydra and jhydra
(minilm/post/ppo_models.py) start from it: with LoRA off it is both the reference policy and the
reward model. One step (in minilm/loop.py's run_loop):
  1. an SFT batch of chat conversations -> LM loss on the assistant tokens;
  2. a batch of preference pairs -> Bradley-Terry loss on the reward head;
  3. loss = lm_weight * LM + rm_weight * BT (`hydra_sft_loss`), AdamW over the model (or its LoRA + heads).

Deviations: the paper's text we could read gives neither the weighting nor the batch composition;
its launch scripts weight the reward term 0.1 (`--rm-weight 0.1`). Our default is the plain sum
(both weights 1; lesson 08 measures both), one batch of each per step, two trunk passes per step.
`minilm reward --lm-weight 1` is the one-pass variant on the chosen replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_prep.instructions import instruction_examples
from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.config import Validated, from_preset
from minilm.loop import OptimConfig, run_loop
from minilm.post.base_model import LoRAConfig, add_lora
from minilm.post.chat import prompts_that_fit
from minilm.post.oracles import AnswerOracle
from minilm.post.preferences import make_pair_batch_fn
from minilm.post.reward import evaluate_pairs, hydra_sft_loss, load_reward_model, reward_data
from minilm.post.sft import evaluate_chat, make_batch_fn, render_examples
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import write_json


@dataclass
class HydraSFTConfig(Validated):
    out_dir: str = "runs/hydra-sft-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    max_steps: int = 100            # optimizer steps
    batch_size: int = 32            # preference pairs per step (64 sequences)
    eval_every: int = 50            # held-out evaluation every N steps
    ckpt_every: int = 50            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=10))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r = 0: full fine-tune; r > 0: LoRA, base frozen
    lm_weight: float = 1.0          # w_lm in loss = w_lm * LM (SFT batch) + w_rm * BT (pair batch)
    rm_weight: float = 1.0          # w_rm; 1 gives the plain sum, the paper's launch scripts use 0.1
    head: str = "reward"
    n_pairs: int = 3000             # requested train pairs (see data_prep/instructions.py)
    n_eval_pairs: int = 300         # held-out pairs
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 160              # longer pairs and conversations are dropped, not cut
    sft_batch_size: int = 16        # conversations per step, besides batch_size pairs
    sources: str = "dictionary,ops1,ops2,ops3,ops4,units,word"  # the SFT conversations (data_prep/instructions.py)
    n_train: int = 4000
    n_eval: int = 100               # held-out prompts judged greedily before/after (chat quality)
    max_new_tokens: int = 96        # reply budget of the greedy judgement (worked replies: 15-90 tokens)


HYDRA_SFT_PRESETS = {
    # ~1M-param model, 2 CPU cores, ~2 minutes. lr 2e-4, a tenth of SFT's peak: at SFT's own 2e-3 the
    # re-warmed schedule knocked held-out ladder accuracy from 0.65 to 0.35 (lesson 08)
    "tiny": dict(lr=2e-4),
    "ci": dict(max_steps=12, batch_size=8, sft_batch_size=8, n_pairs=200, n_train=400, n_eval_pairs=24,
               n_eval=16, eval_every=12, ckpt_every=12),
    "gpu": dict(max_steps=1000, batch_size=64, n_pairs=20000, n_train=20000),
}
HYDRA_SFT_PRESETS["laptop"] = dict(HYDRA_SFT_PRESETS["tiny"], max_steps=60, n_eval=32)   # the 20 minutes
# the fields `minilm hydra-sft --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "sft_batch_size", "lr", "warmup_steps",
         "eval_every", "ckpt_every", "seed", "device", "dtype", "resume", "lora_r", "lora_alpha", "lm_weight",
         "rm_weight", "n_pairs", "n_train", "n_eval_pairs", "n_eval", "max_len")


def hydra_sft_config(preset: str = "tiny", **overrides) -> HydraSFTConfig:
    return from_preset(HydraSFTConfig, HYDRA_SFT_PRESETS, preset, "hydra-sft", **overrides)


def _sft_conversations(cfg: HydraSFTConfig):
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = instruction_examples(cfg.n_train, cfg.data_seed, sources, split="train")
    return train, instruction_examples(cfg.n_eval, cfg.data_seed + 1, sources, split="heldout")


@one_writer
def run_hydra_sft(cfg: HydraSFTConfig, on_step=None) -> dict:
    """Train a Hydra-SFT model; returns held-out pair accuracy and chat quality before/after."""
    check_settings(cfg, "hydra-sft")   # a rerun into this out_dir must have the same settings
    if min(cfg.lm_weight, cfg.rm_weight) < 0 or max(cfg.lm_weight, cfg.rm_weight) == 0:
        raise MinilmError(f"lm_weight and rm_weight must be >= 0 and not both 0, got {cfg.lm_weight}, "
                          f"{cfg.rm_weight}")
    rt = setup_runtime(cfg.device, cfg.dtype)
    # cfg.init's LM with a scalar head on the same trunk: (B, T, D) hidden states -> (B, T) scores
    hydra, tokenizer = load_reward_model(cfg.init, heads=(cfg.head,), device=rt.device)
    if cfg.max_len > hydra.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {hydra.config.max_seq_len}")
    if cfg.lora.r > 0:
        add_lora(cfg.lora, hydra.lm)     # the heads stay trainable
    pad = tokenizer.eot_id
    pairs, heldout_pairs, _ = reward_data(cfg, tokenizer)  # train and held-out never overlap
    chats, heldout_chats = _sft_conversations(cfg)
    # sft_fn(step): (B_sft, T) chats, targets -100 off the assistant tokens; pair_fn(step): (2B, T), chosen first;
    # both are pure functions of (seed, step), so a resumed run sees the same batches
    sft_fn = make_batch_fn(render_examples(tokenizer, chats, cfg.max_len), cfg.sft_batch_size, cfg.seed,
                           pad, cfg.max_len)
    pair_fn = make_pair_batch_fn(pairs, cfg.batch_size, cfg.seed, pad, cfg.max_len)
    oracle = AnswerOracle(chats + heldout_chats)
    # judged prompts must leave room for the reply budget
    heldout_chats = prompts_that_fit(tokenizer, heldout_chats, hydra.lm.config.max_seq_len - cfg.max_new_tokens)

    # pair accuracy from the reward head, chat rates from the LM head alone (model.lm)
    def evaluate(model) -> dict:
        return {**evaluate_pairs(model, heldout_pairs, pad, cfg.max_len, cfg.head),
                **evaluate_chat(model.lm, tokenizer, heldout_chats, oracle, cfg.max_new_tokens)}

    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, hydra.lm, tokenizer, train_state,
                        {**meta, "heads": list(hydra.heads), "lm_weight": cfg.lm_weight,
                         "rm_weight": cfg.rm_weight, "before": before},
                        extra={"heads": hydra.heads.state_dict()})

    hydra.eval()
    before = evaluate(hydra)  # chat quality and pair accuracy BEFORE training
    # 1. LM loss on an SFT batch; 2. BT loss on a pair batch; 3. w_lm * LM + w_rm * BT, AdamW (run_loop).
    # The loop's periodic eval scores the pairs only: greedy chat judging is slow, so it runs at the ends
    summary = run_loop(cfg, hydra, lambda step: {"sft": sft_fn(step), "pairs": pair_fn(step)},
                       lambda model, batch: hydra_sft_loss(model, batch, cfg.lm_weight, cfg.rm_weight, cfg.head),
                       lambda model: evaluate_pairs(model, heldout_pairs, pad, cfg.max_len, cfg.head),
                       save_fn, tokenizer, stage="hydra-sft", rt=rt, on_step=on_step)
    hydra.eval()
    result = {**summary, "before": before, "after": evaluate(hydra), "n_pairs": len(pairs),
              "n_heldout_pairs": len(heldout_pairs)}
    write_json(Path(cfg.out_dir) / "eval.json", result)
    return result

