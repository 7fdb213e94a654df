"""Supervised fine-tuning (SFT) on chat data: the loss, the batches and the held-out judgement (lesson 06).

    loss, metrics = sft_loss(model, batch_fn(step), text_mix=1.0)     # batch_fn = make_batch_fn(...)
    rates = evaluate_chat(model, tok, heldout, AnswerOracle(heldout))  # end_rate, form_rate, correct_rate
    minilm sft --init runs/tiny/checkpoint --out-dir runs/sft-tiny   # the stage: minilm/stages/sft.py

Phi-3's post-training begins with SFT on chat-formatted data (math, coding, reasoning,
conversation; Phi-3 report, arXiv 2404.14219, section 3). Ours: the instruction conversations of
data_prep/instructions.py (by default Devil's Dictionary definitions and the skill ladder's worked
problems; man-page and docstring answers on request), rendered in Phi-3's format by
minilm/post/chat.py, trained with next-token loss on the assistant tokens only (the loss mask).
Batches are padded to their longest row, not packed.

Replay: each step may also draw clean pretraining-text windows and add text_mix * their mean
next-token loss, since pure SFT on short answers wrecks the tiny model's language modelling
(lesson 06, "SFT forgets text"). This is the "pretraining mix" of InstructGPT (arXiv 2203.02155,
PPO-ptx, where it is added to the RL objective, not to SFT); the Phi-3 report does not say its
SFT mixes in pretraining text. The windows are a pure function of (seed, step), so resume is exact.
Deviations from the paper: no multi-turn data, no safety/identity data, far smaller data; the
clean-text replay above.
"""

from __future__ import annotations

import random

import torch

from data_prep.instructions import instruction_examples
from minilm import MinilmError
from minilm.data import TokenDataset
from minilm.generate import generate
from minilm.loop import epoch_batches
from minilm.post.chat import collate, parse_reply, render_chat, render_prompt
from minilm.post.oracles import AnswerOracle


def sft_loss(model, batch: dict, text_mix: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the target tokens (assistant content + <|end|>),
    plus text_mix * the mean next-token loss on the clean-text windows batch["text"], if any."""
    _, loss = model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    n_targets = (batch["targets"] != -100).sum()       # -100: prompt, role tags and padding (no loss)
    pad = 1 - batch["attention_mask"].float().mean()   # what packing could save
    metrics = {"target_tokens": n_targets.item(), "pad_fraction": pad.item(), "chat_loss": loss.item()}
    if text_mix > 0 and "text" in batch:
        _, text_loss = model(batch["text"]["tokens"], batch["text"]["targets"])  # (B, T) windows, no padding
        metrics["text_loss"] = text_loss.item()
        loss = loss + text_mix * text_loss
    return loss, metrics


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
    batch_fn(step, part, parts): its micro-batch `part`, every parts-th example and window.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    picks = epoch_batches(len(examples), batch_size, seed)

    def batch_fn(step: int, part: int = 0, parts: int = 1) -> dict:
        batch = collate([examples[j] for j in picks(step, part, parts)], pad_id, max_len)
        if text is not None:
            x, y = text.batch(text_batch_size, text_seq_len, seed, step)  # fixed by (seed, step)
            x, y = x[part::parts], y[part::parts]
            batch["text"] = {"tokens": x, "targets": y, "attention_mask": torch.ones_like(x)}
        return batch

    return batch_fn


@torch.no_grad()
def greedy_judgements(model, tokenizer, conversations: list[dict], oracle, max_new_tokens: int = 48,
                      batch_size: int = 64) -> list[dict]:
    """oracle.judge of the greedy reply to each conversation's prompt, with the reply and its kind."""
    stops = [tokenizer.special_id("<|end|>"), tokenizer.eot_id]   # a reply ends at either
    judged = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        prompts = [render_prompt(tokenizer, c["messages"][:-1]) for c in chunk]   # all but the answer
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


def sft_data(cfg) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, train sample for eval) conversations, as cfg says."""
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = instruction_examples(cfg.n_train, cfg.data_seed, sources, split="train")
    heldout = instruction_examples(cfg.n_eval, cfg.data_seed + 1, sources, split="heldout")
    return train, heldout, random.Random(cfg.data_seed).sample(train, min(cfg.n_eval, len(train)))
