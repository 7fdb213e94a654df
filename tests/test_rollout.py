"""Batched rollouts: log-probs recomputed by one forward pass match the sampled ones (lesson 07)."""

import pytest
import torch
from conftest import tiny_config

from minilm.generate import Rollout, generate, left_pad, token_logprobs
from minilm.model import Phi3
from minilm.post.chat import TurnClose, close_replies
from minilm.post.heads import last_token_index
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_07


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3(tiny_config()).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_recomputed_logprobs_match_the_rollout(model, use_cache):
    # left-padded prompts of different lengths; a stop token makes some rows end early
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15]]
    r = generate(model, prompts, max_new_tokens=12, temperature=1.0, stop_tokens=list(range(0, 320, 12)),
                 use_cache=use_cache, generator=torch.Generator().manual_seed(3))
    assert r.attention_mask[:, :r.prompt_len].eq(0).any()           # there is left padding
    assert r.attention_mask[:, -1].eq(0).any()                      # and rows that stopped early
    with torch.no_grad():
        lp = token_logprobs(model, r.tokens, r.attention_mask)
    gen = r.gen_mask.bool()
    assert gen.sum() > 8
    torch.testing.assert_close(lp[gen], r.logprobs[gen], atol=1e-5, rtol=0)
    assert (lp[r.attention_mask == 0] == 0).all()                  # padding contributes nothing


def test_recompute_with_temperature(model):
    r = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, temperature=0.7,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = token_logprobs(model, r.tokens, r.attention_mask, temperature=0.7)
        lp1 = token_logprobs(model, r.tokens, r.attention_mask)
    gen = r.gen_mask.bool()
    torch.testing.assert_close(lp[gen], r.logprobs[gen], atol=1e-5, rtol=0)
    assert not torch.allclose(lp1[gen], r.logprobs[gen], atol=1e-3)  # temperature matters


def test_token_logprobs_by_hand(model):
    tokens = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    lp = token_logprobs(model, tokens, mask)
    # the second row, unpadded, scored the textbook way
    logits, _ = model(tokens[1:, :4])
    ref = torch.log_softmax(logits[0, :-1], -1).gather(-1, tokens[1, 1:4, None]).squeeze(-1)
    torch.testing.assert_close(lp[1, 1:4], ref, atol=1e-5, rtol=0)
    # the first row equals the same tokens without padding
    logits, _ = model(tokens[:1, 2:])
    ref = torch.log_softmax(logits[0, :-1], -1).gather(-1, tokens[0, 3:, None]).squeeze(-1)
    torch.testing.assert_close(lp[0, 3:], ref, atol=1e-5, rtol=0)
    # no context -> 0: column 0, the first real token of a left-padded row, padding
    assert lp[0, :3].eq(0).all() and lp[1, 0] == 0 and lp[1, 4] == 0


def test_token_logprobs_is_differentiable(model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    lp = token_logprobs(model, tokens, torch.ones_like(tokens)).sum()
    lp.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


class LongerIsBetter:
    """A toy judge: P(a beats b) is 1 if a is longer, 0 if shorter, 0.5 on equal length."""

    def __init__(self):
        self.seen = []

    def prefer(self, prompt, a, b):
        self.seen += [a, b]
        a, b = (s.replace("<|end|>", "").replace("<|endoftext|>", "") for s in (a, b))
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5


@pytest.fixture(scope="module")
def chat_model():
    from minilm.tokenizer import Tokenizer
    tok = Tokenizer.train(["What is two plus two? It is four. What does ls do? It lists files."] * 3,
                          vocab_size=280, progress=False)
    torch.manual_seed(0)
    return Phi3(tiny_config(vocab_size=tok.n_vocab, max_seq_len=64)).eval(), tok


def test_build_preference_pairs_with_a_toy_oracle(chat_model):
    from minilm.post.dpo import dpo_batch_loss
    from minilm.post.preferences import build_preference_pairs, encode_pairs, pair_batch
    model, tok = chat_model
    prompts = ["What is two plus two?", [{"role": "user", "content": "What does ls do?"}], "Hi"]
    oracle = LongerIsBetter()
    pairs = build_preference_pairs(model, tok, prompts, oracle, n_samples=3, max_new_tokens=8, seed=1)
    assert 0 < len(pairs) <= 3 * 3  # at most C(3, 2) pairs per prompt, ties skipped
    for p in pairs:
        assert len(p["chosen"]) > len(p["rejected"]) and p["p"] == 1.0
        assert p["prompt"] in prompts
    # the judge saw each reply closed by <|end|> or <|endoftext|> (did it end its turn?)
    assert all(s.endswith(("<|end|>", "<|endoftext|>")) for s in oracle.seen)
    again = build_preference_pairs(model, tok, prompts, LongerIsBetter(), n_samples=3, max_new_tokens=8, seed=1)
    assert again == pairs  # a seed makes it reproducible
    # the pairs feed DPO directly: with the policy as its own reference the loss is log 2
    encoded, _ = encode_pairs(tok, pairs, max_len=64)
    loss, _ = dpo_batch_loss(model, pair_batch(encoded, tok.eot_id, 64), reference=model)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-6)


def test_build_preference_pairs_rejects_bad_arguments(chat_model):
    from minilm.post.preferences import build_preference_pairs
    model, tok = chat_model
    with pytest.raises(ValueError, match="n_samples"):
        build_preference_pairs(model, tok, ["Hi"], LongerIsBetter(), n_samples=1)
    with pytest.raises(ValueError, match="prefer"):
        build_preference_pairs(model, tok, ["Hi"], object())


# ---- closing sampled replies as render_chat closes a turn (where a reward head is read) ----

EOT, USER, END, NL = 256, 258, 260, 10   # the byte-level tokenizer's ids (tests/test_chat.py)


@pytest.fixture(scope="module")
def byte_tok():
    """No merges: every character is its byte's id, the special tokens are 256..260."""
    return Tokenizer.train(["no merges needed"], vocab_size=261, progress=False)


def hand_rollout(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> Rollout:
    """A Rollout laid out as generate() lays it out: prompts left-padded to P, then each reply
    (its stop token included), right-padded to the longest; log-probs 0."""
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id)            # (B, P) each
    n = max(len(r) for r in replies)
    reply_tokens = torch.full((len(replies), n), pad_id, dtype=torch.long)
    gen = torch.zeros(len(replies), n, dtype=torch.long)              # (B, N) 1 on generated tokens
    for b, r in enumerate(replies):
        reply_tokens[b, :len(r)], gen[b, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    tokens = torch.cat([prompt_tokens, reply_tokens], dim=1)           # (B, P + N)
    gen_mask = torch.cat([torch.zeros_like(prompt_mask), gen], dim=1)
    return Rollout(tokens, torch.cat([prompt_mask, gen], dim=1), gen_mask, torch.zeros(tokens.shape),
                   prompt_tokens.shape[1])


def test_close_replies_ends_every_reply_as_render_chat_ends_a_turn(byte_tok):
    a, h, x = ord("a"), ord("h"), ord("x")
    replies = [[a, a, END],        # ended: only the "\n" is added
               [h, USER, x],       # ran on into another turn: cut at <|user|>, closed, not ended
               [a, a, a, a],       # cut at the budget: closed, not ended
               [x, EOT]]           # stopped at <|endoftext|>: closed, not ended
    rollout = hand_rollout([[1, 2, 3], [4], [5, 6], [7]], replies, pad_id=EOT)
    tokens, attention, ended = close_replies(rollout, TurnClose.of(byte_tok), pad_id=EOT)
    P = EOT   # padding
    assert tokens.tolist() == [[1, 2, 3, a, a, END, NL, P, P],
                               [P, P, 4, h, END, NL, P, P, P],
                               [P, 5, 6, a, a, a, a, END, NL],
                               [P, P, 7, x, END, NL, P, P, P]]
    assert attention.tolist() == (tokens != P).long().tolist()   # no real token is an <|endoftext|> here
    assert ended.tolist() == [True, False, False, False]
    # every row's last real token, where HydraModel.score reads, is the closing "\n"
    assert tokens.gather(1, last_token_index(attention)[:, None]).flatten().tolist() == [NL] * 4
