"""Phi-3's chat format: messages -> token ids + loss mask, prompts, reply parsing, batching.

    ids, mask = render_chat(tok, [{"role": "user", "content": "What does `ls` do?"},
                                  {"role": "assistant", "content": "list directory contents"}])
    prompt = render_prompt(tok, [{"role": "user", "content": "What does `ls` do?"}])
    text, ended = parse_reply(tok, generated_ids)
    scored = close_replies(rollout, TurnClose.of(tok), pad_id=tok.eot_id)   # reward read where trained
    batch = collate([(ids, mask), ...], pad_id=tok.eot_id, max_len=256)

The format (Phi-3 report, section 3; the template of the released models):

    <|system|>\\nSYSTEM<|end|>\\n<|user|>\\nQUESTION<|end|>\\n<|assistant|>\\nANSWER<|end|>\\n

The role tags and <|end|> are special tokens (one id each); message text is encoded as ordinary
text, so a user who types "<|end|>" cannot forge one. The loss mask is 1 on the assistant's content
tokens and on the <|end|> that closes them: SFT teaches the model to answer AND to stop, and never
to imitate the user. The tokenizer's `encode_chat` encodes the pieces (tag, "\\n", content, <|end|>,
"\\n"): minilm's byte-level BPE each piece separately, Phi-3-mini's SentencePiece BPE the text
between two tags as one piece, as `tokenizers` does (its tags swallow the "\\n"). Either way the
prompt the model sees at generation time ("...<|assistant|>\\n") is token for token the prefix it
saw in training.

`close_replies` closes sampled replies as render_chat closes a turn, so a reward head trained on
the final "\\n" is read there (a reply that did not end is closed too; `ended` says which).
`collate` pads on the right. With causal attention, a real token never attends to a later pad, so
right padding cannot change any real token's output; the attention mask is passed anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLES = ("system", "user", "assistant")


def _check(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is {m!r}; each message must be a dict with 'role' in "
                             f"{ROLES} and a string 'content'")


def render_chat(tokenizer, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of the conversation; mask 1 on assistant content and its <|end|>.

    With add_generation_prompt, "<|assistant|>\\n" is appended (mask 0): the model answers next.
    """
    _check(messages)
    end = tokenizer.special_id("<|end|>")
    pieces, learn = [], []   # special ids (int) and text (str); the tokenizer encodes them
    for m in messages:
        role_learns = int(m["role"] == "assistant")   # learning <|end|> teaches the model to stop
        pieces += [tokenizer.special_id(f"<|{m['role']}|>"), "\n", m["content"], end, "\n"]
        learn += [0, 0, role_learns, role_learns, 0]
    if add_generation_prompt:
        pieces += [tokenizer.special_id("<|assistant|>"), "\n"]
        learn += [0, 0]
    return tokenizer.encode_chat(pieces, learn)


def render_prompt(tokenizer, messages) -> list[int]:
    """Ids of the conversation so far followed by "<|assistant|>\\n": what generation starts from."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise ValueError("the prompt's last message is the assistant's; drop it to ask for a reply")
    return render_chat(tokenizer, messages, add_generation_prompt=True)[0]


def prompts_that_fit(tokenizer, conversations: list[dict], budget: int) -> list[dict]:
    """The conversations whose prompt (all but the last message) renders to at most `budget` ids:
    those a model can be asked with room left for its reply."""
    return [c for c in conversations if len(render_prompt(tokenizer, c["messages"][:-1])) <= budget]


def parse_reply(tokenizer, ids) -> tuple[str, bool]:
    """(text, ended) of generated ids: text before the first special token, stripped;
    ended is True when that special token is <|end|> (the reply closed the turn properly).

    Stopping at ANY special token means a reply that runs on into "<|user|>..." is cut there and
    counted as not ended.
    """
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    specials = set(tokenizer.special_tokens.values())
    stop = next((i for i, t in enumerate(ids) if t in specials), len(ids))   # len(ids): ran out of budget
    ended = stop < len(ids) and ids[stop] == tokenizer.special_id("<|end|>")
    return tokenizer.decode(ids[:stop]).strip(), ended


def closing_ids(tokenizer) -> list[int]:
    """[<|end|>, *"\\n"]: the ids render_chat puts after every message's content (Phi-3-mini's
    <|end|> swallows the "\\n": just [<|end|>])."""
    return tokenizer.encode_chat([tokenizer.special_id("<|end|>"), "\n"], [0, 0])[0]


@dataclass(frozen=True)
class TurnClose:
    """How a turn closes: `ids` (<|end|>, "\\n") end it; a reply stops at any of `specials`."""
    ids: tuple[int, ...]        # ids[0] is <|end|>: a reply that emitted it ended properly
    specials: tuple[int, ...]   # every special id, as parse_reply stops at them

    @classmethod
    def of(cls, tokenizer) -> TurnClose:
        return cls(tuple(closing_ids(tokenizer)), tuple(sorted(tokenizer.special_tokens.values())))


def close_replies(rollout, close: TurnClose, pad_id: int):
    """(tokens, attention_mask, ended) of a Rollout's rows re-closed as render_chat closes a turn.

    Each row becomes prompt + reply cut at its first special token (parse_reply's cut) + close.ids,
    so every row's last real token is the "\\n" after <|end|>: where a reward head is trained
    (render_chat, last_token_index) and so where it must be read. A reply that ended with <|end|>
    only gains the "\\n"; one cut at the budget or at another special token is closed the same way
    and has ended False. tokens, attention_mask: (B, P + W) with W = the longest closed reply, the
    prompts left-padded as in the rollout, the replies right-padded; ended: (B,) bool.
    """
    p = rollout.prompt_len
    specials = torch.tensor(close.specials, device=rollout.tokens.device)
    replies, ended = [], []
    for row, gen in zip(rollout.tokens[:, p:], rollout.gen_mask[:, p:]):   # (N,) each
        reply = row[gen.bool()]                                # the generated ids, stop token included
        hits = torch.isin(reply, specials).nonzero()
        stop = int(hits[0]) if len(hits) else len(reply)       # len: ran out of budget
        ended.append(stop < len(reply) and int(reply[stop]) == close.ids[0])
        replies.append(reply[:stop].tolist() + list(close.ids))
    width = max(len(r) for r in replies)
    tokens = torch.full((len(replies), p + width), pad_id, dtype=torch.long, device=rollout.tokens.device)
    attention = torch.zeros_like(tokens)
    tokens[:, :p], attention[:, :p] = rollout.tokens[:, :p], rollout.attention_mask[:, :p]   # the prompts
    for b, reply in enumerate(replies):
        tokens[b, p:p + len(reply)] = torch.tensor(reply, dtype=torch.long)
        attention[b, p:p + len(reply)] = 1
    return tokens, attention, torch.tensor(ended, device=tokens.device)


def collate(examples, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, loss_mask) pairs into tensors (B, T), T = the longest example (<= max_len).

    tokens[b, t] = ids[t]; targets[b, t] = ids[t + 1] where loss_mask[t + 1] is 1, else -100
    (Phi3.forward compares logits[:, t] with targets[:, t], so the shift happens here);
    attention_mask is 1 on real tokens. Examples longer than max_len are cut to max_len.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    width = min(max(len(ids) for ids, _ in examples), max_len)    # T: pad to the longest row only
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"example {b}: {len(ids)} ids but {len(mask)} mask entries")
        ids, mask = list(ids[:width]), list(mask[:width])
        n = len(ids)
        tokens[b, :n] = torch.tensor(ids, dtype=torch.long)
        attention[b, :n] = 1
        nxt = torch.tensor(ids[1:], dtype=torch.long)          # (n - 1,) the token each position predicts
        learn = torch.tensor(mask[1:], dtype=torch.bool)       # is that next token one to learn?
        targets[b, :n - 1] = torch.where(learn, nxt, torch.full_like(nxt, -100))
    return {"tokens": tokens, "targets": targets, "attention_mask": attention}
