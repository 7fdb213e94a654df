"""Phi-3's chat format: messages -> token ids + loss mask, prompts, reply parsing, batching.

    ids, mask = render_chat(tok, [{"role": "user", "content": "What does `ls` do?"},
                                  {"role": "assistant", "content": "list directory contents"}])
    prompt = render_prompt(tok, [{"role": "user", "content": "What does `ls` do?"}])
    text, ended = parse_reply(tok, generated_ids)
    batch = collate([(ids, mask), ...], pad_id=tok.eot_id, max_len=256)

The format (Phi-3 report, section 3; the template of the released models):

    <|system|>\\nSYSTEM<|end|>\\n<|user|>\\nQUESTION<|end|>\\n<|assistant|>\\nANSWER<|end|>\\n

The role tags and <|end|> are special tokens (one id each); message text is encoded as ordinary
text, so a user who types "<|end|>" cannot forge one. The loss mask is 1 on the assistant's content
tokens and on the <|end|> that closes them: SFT teaches the model to answer AND to stop, and never
to imitate the user. Each piece (tag, "\\n", content, <|end|>, "\\n") is encoded separately, so the
prompt the model sees at generation time ("...<|assistant|>\\n") is token for token the prefix it
saw in training.

`collate` pads on the right. With causal attention, a real token never attends to a later pad, so
right padding cannot change any real token's output; the attention mask is passed anyway.
"""

from __future__ import annotations

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
    end, newline = tokenizer.special_id("<|end|>"), tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], learn: int) -> None:
        ids.extend(tokens)
        mask.extend([learn] * len(tokens))

    for m in messages:    # each piece encoded alone, so a prompt is token for token a training prefix
        learn = int(m["role"] == "assistant")
        add([tokenizer.special_id(f"<|{m['role']}|>")] + newline, 0)
        add(tokenizer.encode(m["content"]), learn)
        add([end], learn)                 # learning <|end|> teaches the model to stop
        add(newline, 0)
    if add_generation_prompt:
        add([tokenizer.special_id("<|assistant|>")] + newline, 0)
    return ids, mask


def render_prompt(tokenizer, messages) -> list[int]:
    """Ids of the conversation so far followed by "<|assistant|>\\n": what generation starts from."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise ValueError("the prompt's last message is the assistant's; drop it to ask for a reply")
    return render_chat(tokenizer, messages, add_generation_prompt=True)[0]


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
