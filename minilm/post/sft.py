"""Supervised fine-tuning (SFT) on chat data, measured before and after (lesson 06).

    minilm sft --init runs/base-tiny/checkpoint --out-dir runs/sft-tiny          # CPU, ~3 minutes
    minilm sft --init runs/base-tiny/checkpoint --out-dir runs/sft-lora --lora-r 8 --lr 3e-3

    from minilm.post.sft import sft_config, run_sft
    summary = run_sft(sft_config("tiny", init="runs/base-tiny/checkpoint"))
    summary["before"]["end_rate"], summary["after"]["end_rate"]

Phi-3's post-training begins with SFT on chat-formatted data (math, coding, reasoning,
conversation; Phi-3 report, section 3). Ours: the instruction conversations of
data_prep/instructions.py (real man-page and docstring answers, computed arithmetic and unit
answers), rendered in Phi-3's format by minilm/post/chat.py, trained with next-token loss on the
assistant tokens only (the loss mask), through the shared loop of minilm/post/loop.py.

  1. load the pretrained checkpoint (cfg.init); with cfg.lora_r > 0 wrap its linear layers with
     LoRA adapters and freeze the rest (minilm/lora.py);
  2. render the train conversations to (ids, loss_mask); a batch is a pure function of
     (seed, step): one shuffled permutation per epoch, cut into batches, right-padded;
  3. measure the held-out prompts BEFORE training: greedy replies, judged by AnswerOracle;
  4. train with `sft_loss` (mean cross-entropy over the masked assistant tokens);
  5. measure again AFTER; save the checkpoint with meta stage "sft" and both measurements.

Batching: padding, not packing. Our conversations are 15-60 tokens and we pad each batch only
to its longest row, so about 40% of the positions are padding (logged as `pad_fraction`).
Packing several conversations into one row would need a block-diagonal attention mask and
per-conversation positions, which the fused attention kernel (causal + key padding mask only)
does not take; at this length the compute it would save does not pay for that complexity.
Deviations from the paper: no multi-turn data, no safety/identity data, far smaller data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.generate import generate
from minilm.post.chat import collate, parse_reply, render_chat, render_prompt
from minilm.post.loop import epoch_batches, from_preset, init_model, PostConfig, run_loop
from minilm.post.oracles import AnswerOracle
from minilm.runtime import setup_runtime


@dataclass
class SFTConfig(PostConfig):
    out_dir: str = "runs/sft-tiny"
    init: str = "runs/base-tiny/checkpoint"
    max_steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 200
    ckpt_every: int = 100
    sources: str = "man,stdlib,arithmetic,units"  # see data_prep/instructions.py
    n_train: int = 4000             # requested train conversations (fewer if sources run out)
    n_eval: int = 200               # held-out prompts judged before and after
    data_seed: int = 0
    max_len: int = 128              # longer conversations are dropped, not cut
    max_new_tokens: int = 32        # reply budget of the greedy eval


SFT_PRESETS = {
    "tiny": dict(),  # the defaults: ~1M-param base model, 2 CPU cores, ~3 minutes
    "small": dict(out_dir="runs/sft-small", init="runs/small/checkpoint", max_steps=1500,
                  batch_size=64, lr=3e-4, n_train=20000, eval_every=250, ckpt_every=250),
}


def sft_config(preset: str = "tiny", **overrides) -> SFTConfig:
    return from_preset(SFTConfig, SFT_PRESETS, preset, "sft", **overrides)


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the target tokens (assistant content + <|end|>)."""
    _, loss = model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    n_targets = (batch["targets"] != -100).sum()
    pad = 1 - batch["attention_mask"].float().mean()
    return loss, {"target_tokens": n_targets.item(), "pad_fraction": pad.item()}


def render_examples(tokenizer, conversations, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per conversation, dropping any longer than max_len tokens."""
    rendered = [render_chat(tokenizer, c["messages"]) for c in conversations]
    kept = [r for r in rendered if len(r[0]) <= max_len]
    if not kept:
        raise MinilmError(f"every conversation is longer than max_len={max_len} tokens; raise --max-len")
    return kept


def make_batch_fn(examples, batch_size: int, seed: int, pad_id: int, max_len: int):
    """batch_fn(step): batch `step` of a shuffled pass over `examples`, one permutation per epoch.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    picks = epoch_batches(len(examples), batch_size, seed)

    def batch_fn(step: int) -> dict:
        return collate([examples[j] for j in picks(step)], pad_id, max_len)

    return batch_fn


@torch.no_grad()
def greedy_judgements(model, tokenizer, conversations: list[dict], oracle, max_new_tokens: int = 48,
                      batch_size: int = 64) -> list[dict]:
    """oracle.judge of the greedy reply to each conversation's prompt, with the reply and its kind."""
    stops = [tokenizer.special_id("<|end|>"), tokenizer.eot_id]
    judged = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        prompts = [render_prompt(tokenizer, c["messages"][:-1]) for c in chunk]
        rollout = generate(model, prompts, max_new_tokens, temperature=0.0, stop_tokens=stops,
                           pad_id=tokenizer.eot_id)
        for c, ids in zip(chunk, rollout.responses()):
            text, ended = parse_reply(tokenizer, ids)
            judged.append({**oracle.judge(c["messages"][:-1], text, ended=ended), "reply": text,
                           "kind": c.get("kind")})
    return judged


@torch.no_grad()
def evaluate_chat(model, tokenizer, conversations, oracle: AnswerOracle, max_new_tokens: int = 32,
                  batch_size: int = 64) -> dict:
    """Greedy replies to each conversation's prompt, judged by `oracle`. Returns the rates:

    end_rate      replies that close with <|end|> within max_new_tokens
    form_rate     replies in the expected form (a bare number, a one-line phrase, ...)
    correct_rate  replies judged correct (see AnswerOracle); reward: the oracle's mean reward
    correct_KIND  correct_rate of each kind of question (man, stdlib, arithmetic, units, ...)
    """
    judged = greedy_judgements(model, tokenizer, conversations, oracle, max_new_tokens, batch_size)
    n = max(1, len(judged))
    rates = {"end_rate": sum(j["ended"] for j in judged) / n,
             "form_rate": sum(j["in_form"] for j in judged) / n,
             "correct_rate": sum(j["correct"] for j in judged) / n,
             "reward": sum(j["reward"] for j in judged) / n}
    for kind in sorted({j["kind"] for j in judged}):  # correct_man, correct_units, ...
        of_kind = [j["correct"] for j in judged if j["kind"] == kind]
        rates[f"correct_{kind}"] = sum(of_kind) / len(of_kind)
    return rates


def sft_data(cfg: SFTConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, train sample for eval) conversations, as cfg says."""
    from data_prep.instructions import instruction_examples
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = instruction_examples(cfg.n_train, cfg.data_seed, sources, split="train")
    heldout = instruction_examples(cfg.n_eval, cfg.data_seed + 1, sources, split="heldout")
    return train, heldout, random.Random(cfg.data_seed).sample(train, min(cfg.n_eval, len(train)))


def run_sft(cfg: SFTConfig, on_step=None) -> dict:
    """Fine-tune cfg.init on chat data; returns {"before", "after", ...} measured on held-out prompts."""
    rt = setup_runtime(cfg.device)
    model, tokenizer = init_model(cfg, rt.device)                           # 1.
    if cfg.max_len > model.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    train, heldout, train_sample = sft_data(cfg)
    examples = render_examples(tokenizer, train, cfg.max_len)               # 2.
    batch_fn = make_batch_fn(examples, cfg.batch_size, cfg.seed, tokenizer.eot_id, cfg.max_len)
    oracle = AnswerOracle(train + heldout)

    def eval_fn(m) -> dict:
        return evaluate_chat(m, tokenizer, heldout, oracle, cfg.max_new_tokens)

    model.eval()
    before = {**eval_fn(model), "train_correct_rate":                        # 3.
              evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}

    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, model, tokenizer, train_state,
                        {**meta, "before": before, "n_train": len(examples), "heldout": len(heldout)})

    summary = run_loop(cfg, model, batch_fn, sft_loss, eval_fn, save_fn, tokenizer,  # 4.
                       stage="sft", rt=rt, on_step=on_step)
    model.eval()  # 5. the loop's last held-out eval, plus the train sample
    after = {**{k: summary[k] for k in before if k in summary}, "train_correct_rate":
             evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}
    result = {**summary, "before": before, "after": after, "n_train": len(examples),
              "n_heldout": len(heldout)}
    Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2))
    return result
