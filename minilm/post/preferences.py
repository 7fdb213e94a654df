"""Preference pairs: batching them for reward models and DPO, and building them from a model.

    batch = pair_batch(tokenizer, pairs, max_len=256)       # chosen rows first, then rejected
    pairs = build_preference_pairs(model, tokenizer, prompts, oracle, n_samples=2)

A pair is {"prompt": messages, "chosen": str, "rejected": str, ...}: the prompt is a list of chat
messages (minilm/post/chat.py) and the two strings are candidate assistant replies.
`data_prep/instructions.py` makes checkable pairs offline; `build_preference_pairs` makes them
on-policy, the way the DPO of Phi-3 (and RLHF in general) labels samples of the model itself:
sample several replies per prompt, let a judge say which is better, keep the decided pairs.
The judge is any object with `prefer(prompt, a, b) -> P(a beats b)`: a rule-based oracle, a
reward model, a person at a keyboard.
"""

from __future__ import annotations

import torch

from minilm.generate import generate
from minilm.loop import epoch_batches
from minilm.post.chat import collate, parse_reply, render_chat, render_prompt
from minilm.tokenizer import TokenizerError


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a plain string becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def encode_pair(tokenizer, pair: dict):
    """((chosen ids, loss mask), (rejected ids, loss mask)) of one pair, rendered as chats.

    render_chat closes every reply with <|end|> (mask 1): right for a reply that closed its turn.
    pair["chosen_ended"] / pair["rejected_ended"] False (default True) marks a sampled reply that
    never did (cut at max_new_tokens or run on into another turn): it is encoded up to its last
    text token, so training never scores an <|end|> the model did not produce.
    """
    for key in ("prompt", "chosen", "rejected"):
        if key not in pair:
            raise ValueError(f"a preference pair needs 'prompt', 'chosen' and 'rejected'; missing {key!r}")
    messages, end = as_messages(pair["prompt"]), tokenizer.special_id("<|end|>")
    out = []
    for key in ("chosen", "rejected"):
        ids, mask = render_chat(tokenizer, messages + [{"role": "assistant", "content": pair[key]}])
        if not pair.get(f"{key}_ended", True):
            cut = len(ids) - 1 - ids[::-1].index(end)        # the reply's closing <|end|>, the last one
            ids, mask = ids[:cut], mask[:cut]                # drops it and the "\n" after it (mask 0)
        out.append((ids, mask))
    return tuple(out)


def encode_pairs(tokenizer, pairs: list[dict], max_len: int) -> tuple[list[tuple], list[dict]]:
    """(encode_pair of each pair that fits in max_len tokens, those pairs), in order.

    Cutting a too-long pair would cut the end of the replies, exactly where chosen and rejected
    differ, so such pairs are dropped rather than truncated.
    """
    kept = [(e, p) for p in pairs      # e: (chosen (ids, mask), rejected (ids, mask))
            for e in [encode_pair(tokenizer, p)] if max(len(e[0][0]), len(e[1][0])) <= max_len]
    if not kept:
        raise ValueError(f"no preference pair fits in max_len={max_len} tokens; raise max_len")
    return [e for e, _ in kept], [p for _, p in kept]


def step_end_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the tokens that end a step of a reply: every token whose text holds a newline, and <|end|>."""
    specials, ends = set(tokenizer.special_tokens.values()), [tokenizer.special_id("<|end|>")]
    for i in set(range(tokenizer.n_vocab)) - specials:
        try:
            if "\n" in tokenizer.decode([i]):
                ends.append(i)
        except TokenizerError:   # an id no token has (cl100k_base leaves gaps before its chat tokens)
            pass
    return tuple(sorted(ends))


def credit_mask(tokens: torch.Tensor, loss_mask: torch.Tensor, step_ends: tuple[int, ...]) -> torch.Tensor:
    """loss_mask cut after the first step where each pair's two replies part (Step-DPO's unit).

    tokens, loss_mask: (2B, T), chosen rows then their rejected twins. Per pair, p is the first
    position where the two rows differ; each row keeps its reply tokens up to and including its
    first step end at or after p. The shared prefix stays in: its log-ratio is the same on both
    sides and cancels in the DPO margin. What goes is the tail after the parting step, which a
    wrong reply fills consistently with its own error (it copies the wrong number into "The answer
    is"), so that whole-reply credit would also punish the copying.
    """
    b, t = tokens.shape[0] // 2, tokens.shape[1]
    pos = torch.arange(t).expand(b, t)
    differ = tokens[:b] != tokens[b:]                                   # (B, T)
    parts = torch.where(differ.any(1), (differ * 1).argmax(1), t)       # (B,) first differing position
    parts = parts.repeat(2)[:, None]                                    # (2B, 1): both rows of a pair
    is_end = torch.isin(tokens, torch.tensor(step_ends)) & (torch.arange(t) >= parts)
    last = torch.where(is_end.any(1), (is_end * 1).argmax(1), t - 1)[:, None]   # (2B, 1) step end
    return loss_mask * (pos.repeat(2, 1) <= last).long()


def pair_batch(encoded: list[tuple], pad_id: int, max_len: int,
               step_ends: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Right-padded tensors (2B, T) for B encoded pairs: rows [0, B) chosen, rows [B, 2B) rejected.

    tokens, attention_mask, targets (next-token targets, -100 off the replies, as chat.collate);
    loss_mask (2B, T) is 1 where tokens[:, t] is a reply token (aligned with the tokens, not the
    targets), the mask `sequence_logprobs` sums over. One batch holds both sides of every pair,
    so one forward pass scores them all. With step_ends (`step_end_ids`), credit_mask is the
    loss_mask cut after the step where the two replies part (`credit_mask`); else it is loss_mask.
    """
    rows = [e[0] for e in encoded] + [e[1] for e in encoded]     # B chosen, then B rejected
    batch = collate(rows, pad_id, max_len)
    loss_mask = torch.zeros_like(batch["tokens"])
    loss_mask[:, 1:] = (batch["targets"][:, :-1] != -100).long()  # target t is token t + 1
    batch["loss_mask"] = loss_mask
    batch["credit_mask"] = credit_mask(batch["tokens"], loss_mask, step_ends) if step_ends else loss_mask
    return batch


def make_pair_batch_fn(encoded: list[tuple], batch_size: int, seed: int, pad_id: int, max_len: int,
                       step_ends: tuple[int, ...] = ()):
    """batch_fn(step) -> pair_batch of the step's pairs: one shuffled pass per epoch;
    batch_fn(step, part, parts): of every parts-th of them (a micro-batch, minilm/loop.py).

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    picks = epoch_batches(len(encoded), batch_size, seed)

    def batch_fn(step: int, part: int = 0, parts: int = 1) -> dict:
        return pair_batch([encoded[j] for j in picks(step, part, parts)], pad_id, max_len, step_ends)

    return batch_fn


def pair_batches(encoded: list[tuple], pad_id: int, max_len: int, batch_size: int = 64,
                 step_ends: tuple[int, ...] = ()):
    """Every pair once, in order, in batches: for held-out evaluation."""
    for start in range(0, len(encoded), batch_size):
        yield pair_batch(encoded[start:start + batch_size], pad_id, max_len, step_ends)


def reply_for_judge(tokenizer, ids) -> tuple[str, str]:
    """(clean reply text, the string a judge sees): "<|end|>" follows a reply that closed its turn,
    "<|endoftext|>" one that did not (cut at max_new_tokens or ran into another turn)."""
    text, ended = parse_reply(tokenizer, ids)
    return text, text + ("<|end|>" if ended else "<|endoftext|>")


def sample_replies(model, tokenizer, prompts: list, n_samples: int, max_new_tokens: int = 64,
                   temperature: float = 1.0, top_p: float | None = None, batch_size: int = 32,
                   generator: torch.Generator | None = None) -> list[list[tuple[str, str]]]:
    """n_samples replies per prompt, each (text, judged string) as `reply_for_judge` returns,
    sampled in batches with the KV cache."""
    ids = [render_prompt(tokenizer, as_messages(p)) for p in prompts]
    flat = [i for i in ids for _ in range(n_samples)]           # each prompt n_samples times
    stops = [tokenizer.special_id("<|end|>"), tokenizer.eot_id]
    texts = []
    for start in range(0, len(flat), batch_size):
        rollout = generate(model, flat[start:start + batch_size], max_new_tokens, temperature=temperature,
                           top_p=top_p, stop_tokens=stops, pad_id=tokenizer.eot_id, generator=generator)
        texts += [reply_for_judge(tokenizer, r) for r in rollout.responses()]
    return [texts[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]


def build_preference_pairs(model, tokenizer, prompts: list, oracle, n_samples: int = 2,
                           max_new_tokens: int = 64, temperature: float = 1.0, top_p: float | None = None,
                           tie_margin: float = 0.0, batch_size: int = 32, seed: int = 0) -> list[dict]:
    """Sample n_samples replies per prompt and label every pair of distinct replies with oracle.prefer.

    A pair is kept when |P(a beats b) - 0.5| > tie_margin (ties carry no preference and are
    skipped); the winner becomes "chosen". Each kept pair records the judge's probability "p"
    that chosen beats rejected. Returns pairs in prompt order.

    The judge sees each reply followed by "<|end|>" or "<|endoftext|>" (did it close its turn?);
    the pair stores the clean text, which render_chat closes with <|end|> in training.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 to form a pair, got {n_samples}")
    if not hasattr(oracle, "prefer"):
        raise ValueError(f"oracle {oracle!r} has no prefer(prompt, a, b) method")
    g = torch.Generator().manual_seed(seed)
    replies = sample_replies(model, tokenizer, prompts, n_samples, max_new_tokens, temperature,
                             top_p, batch_size, g)
    pairs = []
    for prompt, texts in zip(prompts, replies):
        for i in range(n_samples):
            for j in range(i + 1, n_samples):
                (a, judged_a), (b, judged_b) = texts[i], texts[j]
                if a == b:
                    continue  # identical texts: nothing to prefer, nothing to learn
                p = float(oracle.prefer(prompt, judged_a, judged_b))
                if abs(p - 0.5) <= tie_margin:      # a tie carries no preference
                    continue
                chosen, rejected = (a, b) if p > 0.5 else (b, a)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                              "p": max(p, 1 - p), "reason": "sampled"})
    return pairs
