"""Supervised fine-tuning (SFT) on chat data, measured before and after (lesson 06).

    minilm sft --init runs/base-tiny/checkpoint --out-dir runs/sft-tiny-v2       # CPU, ~4 minutes
    minilm sft --init runs/base-tiny/checkpoint --text-mix 0    # pure SFT: no clean-text replay
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
  4. train with `sft_loss` (mean cross-entropy over the masked assistant tokens, plus text_mix
     times the next-token loss on a few windows of clean pretraining text);
  5. measure again AFTER; save the checkpoint with meta stage "sft" and both measurements.
  Every measurement includes `text_val_loss`, the held-out clean-text loss, when the text is known.

Replay. Pure SFT (600 steps at the pretraining lr on ~3.5k short answers) wrecks the language
model: the tiny base scores 4.42 nats/token on held-out clean text, after pure SFT 8.18, worse
than uniform (ln 2048 = 7.62), confidently predicting digits and <|end|> in running prose (lesson
06, "SFT forgets text"). So each step also draws text_batch_size windows of text_seq_len tokens
from the train split of the shards cfg.init was pretrained on (recorded in its train_state.pt;
or cfg.text_data) and adds text_mix * their mean next-token loss: the "pretraining mix" of
InstructGPT (Ouyang et al. 2022, PPO-ptx, where it is added to the RL objective, not to SFT).
The Phi-3 report does not say its SFT mixes in pretraining text; this is our choice. The windows
are a pure function of (seed, step), like the chat batches, so resume stays exact. When no
pretraining data can be found the replay is switched off with a notice, not an error.

Batching: padding, not packing. Our conversations are 15-60 tokens and we pad each batch only
to its longest row, so about 40% of the positions are padding (logged as `pad_fraction`).
Packing several conversations into one row would need a block-diagonal attention mask and
per-conversation positions, which the fused attention kernel (causal + key padding mask only)
does not take; at this length the compute it would save does not pay for that complexity.
Deviations from the paper: no multi-turn data, no safety/identity data, far smaller data;
the clean-text replay above.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.data import TokenDataset
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
    # clean-text replay: every step also takes the next-token loss on pretraining text, weighted
    # text_mix, so that SFT does not destroy language modelling (module docstring, "Replay")
    text_mix: float = 1.0           # weight of the clean-text loss; 0: pure SFT (no replay)
    text_data: str = ""             # prepared shards (train split replayed, val split measured);
                                    # "": the data cfg.init was pretrained on, when findable
    text_batch_size: int = 8        # clean-text windows per step
    text_seq_len: int = 128         # tokens per window (at most the model's max_seq_len)


SFT_PRESETS = {
    "tiny": dict(),  # the defaults: ~1M-param base model, 2 CPU cores, ~4 minutes
    "small": dict(out_dir="runs/sft-small", init="runs/small/checkpoint", max_steps=1500,
                  batch_size=64, lr=3e-4, n_train=20000, eval_every=250, ckpt_every=250),
}


def sft_config(preset: str = "tiny", **overrides) -> SFTConfig:
    return from_preset(SFTConfig, SFT_PRESETS, preset, "sft", **overrides)


def sft_loss(model, batch: dict, text_mix: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the target tokens (assistant content + <|end|>),
    plus text_mix * the mean next-token loss on the clean-text windows batch["text"], if any."""
    _, loss = model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    n_targets = (batch["targets"] != -100).sum()
    pad = 1 - batch["attention_mask"].float().mean()
    metrics = {"target_tokens": n_targets.item(), "pad_fraction": pad.item(), "chat_loss": loss.item()}
    if text_mix > 0 and "text" in batch:
        _, text_loss = model(batch["text"]["tokens"], batch["text"]["targets"])  # (B, T) windows, no padding
        metrics["text_loss"] = text_loss.item()
        loss = loss + text_mix * text_loss
    return loss, metrics


def find_text_data(cfg: SFTConfig, tokenizer) -> Path | None:
    """The clean-text shards for replay and measurement: cfg.text_data, or else the phase-1 data
    cfg.init was pretrained on, as its train_state.pt records it (None when that is not findable:
    e.g. an init that is itself a post-trained checkpoint, or data deleted since)."""
    explicit = bool(cfg.text_data)
    directory = Path(cfg.text_data) if explicit else None
    state_path = Path(cfg.init) / "train_state.pt"
    if directory is None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        recorded = state.get("train_config")  # only pretraining (minilm/train.py) writes this
        if isinstance(recorded, dict) and recorded.get("data_dir"):
            directory = Path(recorded["data_dir"])
        elif isinstance(recorded, dict):  # "": the default data pipeline's phase 1, never built here
            from minilm.train import default_data
            docs = recorded.get("pipeline_docs_per_source", 400)
            directory = default_data(tokenizer.n_vocab, docs, build=False)[0]
    if directory is None or not (directory / "meta.json").exists():
        if explicit:
            raise MinilmError(f"text_data {cfg.text_data} holds no prepared shards (no meta.json); "
                              f"pass the phase-1 directory of `minilm prepare` / data_prep/pipeline.py")
        return None
    fingerprint = json.loads((directory / "meta.json").read_text())["tokenizer"]["fingerprint"]
    if fingerprint != tokenizer.fingerprint():
        if explicit:
            raise MinilmError(f"{directory} was tokenized with another tokenizer than {cfg.init}'s")
        return None
    return directory


@torch.no_grad()
def clean_text_loss(model, data: TokenDataset, n_batches: int = 8, batch_size: int = 16) -> float:
    """Mean next-token loss (nats/token) on fixed full-length windows of `data` (as pretraining's eval)."""
    device = next(model.parameters()).device
    losses = [model(x.to(device), y.to(device))[1].item()
              for x, y in data.eval_batches(n_batches, batch_size, model.config.max_seq_len)]
    return sum(losses) / len(losses)


def render_examples(tokenizer, conversations, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per conversation, dropping any longer than max_len tokens."""
    rendered = [render_chat(tokenizer, c["messages"]) for c in conversations]
    kept = [r for r in rendered if len(r[0]) <= max_len]
    if not kept:
        raise MinilmError(f"every conversation is longer than max_len={max_len} tokens; raise --max-len")
    return kept


def make_batch_fn(examples, batch_size: int, seed: int, pad_id: int, max_len: int,
                  text: TokenDataset | None = None, text_batch_size: int = 8, text_seq_len: int = 128):
    """batch_fn(step): batch `step` of a shuffled pass over `examples`, one permutation per epoch,
    plus (when `text` is given) batch["text"]: text_batch_size random windows of text_seq_len tokens.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    picks = epoch_batches(len(examples), batch_size, seed)

    def batch_fn(step: int) -> dict:
        batch = collate([examples[j] for j in picks(step)], pad_id, max_len)
        if text is not None:
            x, y = text.batch(text_batch_size, text_seq_len, seed, step)  # fixed by (seed, step)
            batch["text"] = {"tokens": x, "targets": y, "attention_mask": torch.ones_like(x)}
        return batch

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
    if cfg.text_mix < 0:
        raise MinilmError(f"text_mix must be >= 0 (the weight of the clean-text loss), got {cfg.text_mix}")
    text_dir = find_text_data(cfg, tokenizer)
    if cfg.text_mix > 0 and text_dir is None:  # the preset's default must not stop a run: say so, go on
        tqdm.write(f"text replay OFF: {cfg.init} records no pretraining data found on this machine; "
                   f"pass --text-data DIR (prepared shards) to keep text_mix={cfg.text_mix}")
    replay = TokenDataset(text_dir, "train") if cfg.text_mix > 0 and text_dir is not None else None
    batch_fn = make_batch_fn(examples, cfg.batch_size, cfg.seed, tokenizer.eot_id, cfg.max_len, replay,
                             cfg.text_batch_size, min(cfg.text_seq_len, model.config.max_seq_len))
    oracle = AnswerOracle(train + heldout)
    text_val = TokenDataset(text_dir, "val") if text_dir is not None else None

    def eval_fn(m) -> dict:  # chat rates, and the held-out clean-text loss when the data is known
        rates = evaluate_chat(m, tokenizer, heldout, oracle, cfg.max_new_tokens)
        return rates if text_val is None else {**rates, "text_val_loss": clean_text_loss(m, text_val)}

    model.eval()
    before = {**eval_fn(model), "train_correct_rate":                        # 3.
              evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}

    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, model, tokenizer, train_state,
                        {**meta, "before": before, "n_train": len(examples), "heldout": len(heldout)})

    summary = run_loop(cfg, model, batch_fn, partial(sft_loss, text_mix=cfg.text_mix),  # 4.
                       eval_fn, save_fn, tokenizer,
                       stage="sft", rt=rt, on_step=on_step)
    model.eval()  # 5. the loop's last held-out eval, plus the train sample
    after = {**{k: summary[k] for k in before if k in summary}, "train_correct_rate":
             evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}
    result = {**summary, "before": before, "after": after, "n_train": len(examples),
              "n_heldout": len(heldout), "text_data": str(text_dir) if text_dir else None,
              "text_mix": cfg.text_mix if replay is not None else 0.0}
    Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2))
    return result
