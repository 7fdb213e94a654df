"""Sampling: KV cache vs recompute, left padding, stop tokens, top-k/top-p (lesson 01)."""

import pytest
import torch
from conftest import tiny_config

from minilm.generate import generate, left_pad, sample_next, token_logprobs
from minilm.model import Phi3

pytestmark = pytest.mark.lesson_01


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3(tiny_config()).eval()


def test_kv_cache_gives_the_same_tokens_as_recomputing(model):
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20)
    cached = generate(model, prompts, use_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    full = generate(model, prompts, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)


def test_batched_left_padded_prompts_equal_one_at_a_time(model):
    prompts = [[11, 12, 13, 14, 15], [16, 17], [18]]
    batch = generate(model, prompts, max_new_tokens=8, temperature=0).responses()
    alone = [generate(model, [p], max_new_tokens=8, temperature=0).responses()[0] for p in prompts]
    assert batch == alone


def test_rollout_masks_and_logprobs(model):
    r = generate(model, [[1, 2, 3], [4]], max_new_tokens=5, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert r.prompt_len == 3 and r.tokens.shape == (2, 8)
    assert r.attention_mask[1, :2].tolist() == [0, 0]  # left padding of the short prompt
    assert r.gen_mask[:, :3].sum() == 0 and r.gen_mask[:, 3:].all()
    assert (r.logprobs[:, 3:] < 0).all() and (r.logprobs[:, :3] == 0).all()
    # each stored log-prob is the model's log-softmax at that position (temperature 1)
    logits, _ = model(r.tokens, attention_mask=r.attention_mask)
    lp = torch.log_softmax(logits[:, 2:-1], -1).gather(-1, r.tokens[:, 3:, None]).squeeze(-1)
    torch.testing.assert_close(lp, r.logprobs[:, 3:], atol=1e-5, rtol=1e-5)


def test_a_rollout_feeds_a_differentiable_forward(model):
    # the loop runs under inference_mode; what it returns must still enter autograd, as PPO's does
    rollout = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=4, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    fields = (rollout.tokens, rollout.attention_mask, rollout.gen_mask, rollout.logprobs)
    assert not any(t.is_inference() for t in fields)
    model.zero_grad()
    token_logprobs(model, rollout.tokens, rollout.attention_mask).sum().backward()
    assert model.lm_head.weight.grad is not None
    # and the recomputed log-probs are the sampled ones
    recomputed = token_logprobs(model, rollout.tokens, rollout.attention_mask).detach()
    torch.testing.assert_close(recomputed * rollout.gen_mask, rollout.logprobs, atol=1e-5, rtol=1e-5)


def test_stop_token_ends_a_row_and_pads_the_rest(model):
    first = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0).responses()[0]
    stop = first[2]  # greedy decoding emits `stop` as its third token
    r = generate(model, [[1, 2, 3], [1, 2, 3]], max_new_tokens=6, temperature=0, stop_tokens=[stop])
    for row in r.responses():
        assert row[-1] == stop and len(row) == first.index(stop) + 1
    assert r.tokens.shape[1] == 3 + len(r.responses()[0])  # stopped early: all rows done


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g)[0], greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g)[0], greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(probs.log(), top_p=0.75, generator=g)[0].item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_bad_prompts_are_explained(model):
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], max_new_tokens=10)
