"""Sampling from a model: temperature, top-k, top-p, stop tokens, batched prompts, KV cache.

    rollout = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0.8, top_p=0.95,
                       stop_tokens=[tok.eot_id])
    texts = generate_text(model, tok, ["def main():"], max_new_tokens=50)
    for token_id in stream(model, prompt_ids, max_new_tokens=64, stop_tokens=[tok.eot_id]): ...

Prompts of different lengths are left-padded so every row's next token sits in the same column;
the attention mask hides the padding and positions skip it (see minilm/model.py). With the KV
cache, the prompt is read once and each new token costs one position's forward pass.

`Rollout` is the structure PPO, DNO and LTC consume: the tokens, their attention mask, the mask
of generated tokens, and each generated token's log-probability under the distribution it was
sampled from (logits / temperature, before top-k/top-p truncation; greedy: temperature 1).
`token_logprobs` recomputes them (or any sequence's log-probs) with one differentiable forward pass.

`stream` is the one-sequence, token-at-a-time face of the same loop, for a chat: it yields each id
as soon as it is sampled. With the same generator it yields exactly `generate`'s tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minilm.model import KVCache, longrope_restart
from minilm.config import Validated


@dataclass
class SampleConfig(Validated):
    """How a stage samples replies: the token budget and the sampling distribution."""
    max_new_tokens: int = 32        # tokens sampled at most per reply
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0              # nucleus sampling; 1: the whole distribution


@dataclass
class Rollout:
    tokens: torch.Tensor          # (B, P + N) int64: left-padded prompts, then generated tokens
    attention_mask: torch.Tensor  # (B, P + N) 1 on real tokens (prompt and generated), 0 on padding
    gen_mask: torch.Tensor        # (B, P + N) 1 on generated tokens, the stop token included
    logprobs: torch.Tensor        # (B, P + N) log-prob of each generated token, 0 elsewhere
    prompt_len: int               # P, the padded prompt width

    def responses(self, strip: tuple[int, ...] = ()) -> list[list[int]]:
        """Generated ids of each row, without the padding and without tokens in `strip`."""
        out = []
        for row, mask in zip(self.tokens[:, self.prompt_len:], self.gen_mask[:, self.prompt_len:]):  # (N,) each
            out.append([t for t in row[mask.bool()].tolist() if t not in strip])
        return out


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """(tokens, mask): prompts right-aligned in a (B, P) tensor, mask 1 on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return tokens, mask


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                vocab_limit: int | None = None):
    """Pick one token per row from logits (B, V); returns (tokens (B,), their log-probs (B,)).

    Ids >= vocab_limit (a model wider than its tokenizer) are never picked; like top-k and top-p
    this truncates the sampling distribution, not the recorded log-probs."""
    logits = logits.float()  # (B, V); sample in fp32 even under bf16
    cut = vocab_limit is not None and vocab_limit < logits.shape[-1]
    if temperature <= 0:  # greedy
        token = (logits.index_fill(-1, torch.arange(vocab_limit, logits.shape[-1], device=logits.device),
                                   float("-inf")) if cut else logits).argmax(-1)
        # greedy records temperature-1 log-probs
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    # the recorded log-probs come from this untruncated distribution, as PPO's recompute sees it
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    filtered = logprobs.clone()
    if cut:
        filtered[:, vocab_limit:] = float("-inf")
    if top_k is not None and top_k < filtered.shape[-1]:
        kth = filtered.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        filtered[filtered < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = filtered.sort(dim=-1, descending=True)  # (B, V) each
        cum = sorted_lp.softmax(-1).cumsum(-1)
        drop = cum - sorted_lp.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        # back from sorted to vocabulary order
        filtered.scatter_(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    token = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(), pad_id: int = 0,
             use_cache: bool = True, generator: torch.Generator | None = None) -> Rollout:
    """Sample up to `max_new_tokens` for each prompt; a row stops after emitting a stop token.

    The loop runs under torch.inference_mode: no autograd bookkeeping at all (no version counters,
    no view tracking), the same kernels and results as no_grad, about a fifth less time per token
    for a small model. Its tensors cannot enter autograd later, and PPO does feed a rollout's tokens
    to a differentiable forward, so the Rollout holds copies made outside it."""
    with torch.inference_mode():
        columns, p = _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id,
                               use_cache, generator)
    return Rollout(*(x.clone() for x in columns), p)   # clone: normal tensors, contiguous


def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id, use_cache,
              generator) -> tuple[list[torch.Tensor], int]:
    """generate's loop: the (B, P + N) tokens, attention mask, gen mask and log-probs, and P."""
    device = next(model.parameters()).device
    tokens, mask = left_pad(prompts, pad_id, device)  # (B, P) each
    b, p = tokens.shape
    if p + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    # room for every position this call can reach: the prompt and all new tokens
    cache = KVCache(model.config, b, p + max_new_tokens, device,
                    next(model.parameters()).dtype) if use_cache else None
    # every buffer is allocated once for the longest reply, (B, P + N), and filled column by column
    tokens = torch.cat([tokens, tokens.new_full((b, max_new_tokens), pad_id)], dim=1)
    mask = torch.cat([mask, mask.new_zeros(b, max_new_tokens)], dim=1)  # 1 on real tokens
    gen = torch.zeros_like(mask)  # 1 on generated tokens: none in the prompt
    # what the model attends over: the prompt's padding, then every generated column. A finished row's
    # later columns count too: its outputs are thrown away, and its padding stays on the left, which
    # the decode kernel reads as one start index per row (minilm/ops/attention.py). No padding at
    # all: no mask, so no step builds one (positions are then simply 0, 1, 2, ...)
    padded = not bool(mask[:, :p].all())
    attend = torch.cat([mask[:, :p], mask.new_ones(b, max_new_tokens)], dim=1) if padded else None
    logprobs = torch.zeros(b, p + max_new_tokens, device=device)  # 0 off the generated tokens
    done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,) rows that emitted a stop token
    n = p  # columns filled so far
    step_input = tokens[:, :p]  # the whole prompt first; then one token
    for _ in range(max_new_tokens):
        if cache is not None and longrope_restart(model.config, cache.length, step_input.shape[1]):
            cache.length, step_input = 0, tokens[:, :n]   # LongRoPE: every key again, with the long factors
        # (B, T_in, V): with the cache only the new positions run; the mask covers every position so far
        logits, _ = model(step_input if use_cache else tokens[:, :n], kv_cache=cache,
                          attention_mask=attend[:, :n] if padded else None)
        token, lp = sample_next(logits[:, -1], temperature, top_k, top_p, generator,
                                getattr(model, "tokenizer_vocab", None))  # (B,), (B,)
        alive = ~done
        # finished rows get padding, masked out of attention, gen_mask and logprobs
        tokens[:, n] = torch.where(alive, token, torch.full_like(token, pad_id))
        mask[:, n] = gen[:, n] = alive.long()
        logprobs[:, n] = torch.where(alive, lp, 0.0)
        done |= torch.isin(tokens[:, n], stop) & alive  # the stop token itself stays generated
        step_input, n = tokens[:, n:n + 1], n + 1
        if done.all():  # every row stopped: N may end below max_new_tokens
            break
    model.train(was_training)
    return [x[:, :n] for x in (tokens, mask, gen, logprobs)], p


def token_logprobs(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every token given the ones before it, from one forward pass (differentiable).

    tokens, attention_mask: (B, T), padding on either side. Returns (B, T) float32 with
    [:, t] = log p(tokens[:, t] | tokens[:, :t]) under softmax(logits / temperature), and 0 where
    nothing real precedes the token (t = 0, a left-padded row's first token) and on padding.
    For a `Rollout` sampled at this temperature it reproduces `rollout.logprobs` on `gen_mask`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    logits = model(tokens, attention_mask=attention_mask)[0]          # (B, T, V); Phi3 or HydraModel
    scale = temperature if temperature > 0 else 1.0  # greedy rollouts record temperature-1 log-probs
    logprobs = torch.log_softmax(logits[:, :-1].float() / scale, dim=-1)
    picked = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)     # (B, T - 1): predicts t + 1
    picked = torch.cat([picked.new_zeros(tokens.shape[0], 1), picked], dim=1)  # (B, T): realign to token t
    # a token counts only if it is real and a real token precedes it (its prediction had context)
    has_context = attention_mask.long().cumsum(-1) > 1
    return picked * (has_context & attention_mask.bool())


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, **kwargs) -> list[str]:
    """Encode string prompts, generate (stopping at <|endoftext|>), decode only the continuations.

    Prompts are plain text: "<|endoftext|>" or "<|user|>" typed in a prompt are characters, never
    special ids (a caller who wants special tokens builds ids and calls `generate`). A continuation
    is the text prompt + reply decodes to past the prompt's own: decoded alone, a SentencePiece
    reply would lose the space its first "▁" stands for."""
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]  # empty: <|endoftext|>
    kwargs.setdefault("stop_tokens", [tokenizer.eot_id])
    rollout = generate(model, ids, max_new_tokens, pad_id=tokenizer.eot_id, **kwargs)
    replies = rollout.responses(strip=(tokenizer.eot_id,))
    return [tokenizer.decode(p + r)[len(tokenizer.decode(p)):] for p, r in zip(ids, replies)]


def stream(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield the new token ids of ONE sequence, each as soon as it is sampled (KV cache).

    The stop token that ends the reply is yielded too, as `generate` keeps it in `gen_mask`, so the
    caller sees why the reply ended; nothing follows it. Checks happen here, at the call, not at
    the first `next()`: a prompt that leaves no room for `max_new_tokens` fails immediately.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("stream needs a prompt of at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len {model.config.max_seq_len}; shorten the prompt or "
                         f"ask for fewer tokens")
    return _stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, set(stop_tokens), generator)


@torch.inference_mode()  # on a generator function, only while the generator runs; it yields ints
def _stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop, generator):
    param = next(model.parameters())
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, param.device, param.dtype)
    step_input = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)  # (1, P)
    seen = list(prompt_ids)   # the whole sequence, for a LongRoPE restart
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if longrope_restart(model.config, cache.length, step_input.shape[1]):
                cache.length, step_input = 0, torch.tensor([seen], device=param.device)
            # no attention mask: one unpadded row, so positions are simply 0, 1, 2, ... and the
            # unmasked attention path (our kernel on CPU) serves it
            logits, _ = model(step_input, kv_cache=cache)            # (1, T, V), T = P then 1
            token, _ = sample_next(logits[:, -1], temperature, top_k, top_p, generator,
                                   getattr(model, "tokenizer_vocab", None))
            yield int(token)
            if int(token) in stop:
                return
            step_input = token[:, None]                               # (1, 1)
            seen.append(int(token))
    finally:  # also runs when the caller stops early (closes the generator)
        model.train(was_training)
