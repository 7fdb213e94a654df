"""Phi-3's long-context settings against Hugging Face's Phi3ForCausalLM (lessons/01_transformer.md).

Sliding-window attention (phi-3-mini-4k: each query sees its last 2047 keys) and LongRoPE (the
128k models: per-frequency short and long factors plus a cos/sin scale) on tiny random configs
that carry them: logits, left-padded batches, KV-cache decoding and greedy generation past the
window and past the original context equal HF's, and the configs survive export and import.

    pytest -m lesson_01 tests/test_long_context.py -q
"""

import pytest
import torch

pytest.importorskip("transformers", reason="test-only extra transformers not installed")
from conftest import tiny_config
from transformers import Phi3Config, Phi3ForCausalLM

from minilm import MinilmError, ops
from minilm.checkpoint import config_from_hf, export_hf, hf_config, import_hf
from minilm.config import ConfigError
from minilm.generate import generate
from minilm.model import Phi3
from minilm.ops.reference import attention_reference, causal_mask

pytestmark = pytest.mark.lesson_01

TOL = dict(rtol=1e-5, atol=1e-4)
HALF = 8    # head_dim 16 / 2: one factor per frequency
SHORT = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0]
LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]
CASES = {
    "sliding window 6": dict(ours=dict(sliding_window=6), hf=dict(sliding_window=6)),
    "longrope 16 -> 64": dict(ours=dict(rope_original_max_len=16, rope_short_factor=SHORT, rope_long_factor=LONG),
                              hf=dict(original_max_position_embeddings=16,
                                      rope_parameters={"rope_type": "longrope", "rope_theta": 500.0,
                                                       "short_factor": SHORT, "long_factor": LONG})),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    """(ours, hf, cfg) with identical large random weights; the HF config is written by hand."""
    cfg = tiny_config(rope_theta=500.0, n_kv_head=2, tie_embeddings=False, **CASES[request.param]["ours"])
    hf_cfg = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    hf = Phi3ForCausalLM(Phi3Config(**{**hf_cfg, **CASES[request.param]["hf"]})).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.3 * torch.randn(p.shape, generator=g))
    ours = Phi3(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf, cfg


def test_the_window_mask_by_hand():
    # T = S = 4, W = 2: each query sees itself and the key before it
    assert causal_mask(4, 4, window=2).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # decoding one query over 5 cached keys keeps the last 2
    assert causal_mask(1, 5, window=2).int().tolist() == [[0, 0, 0, 1, 1]]


@pytest.mark.parametrize("backend", ops.available_backends())
def test_every_backend_applies_the_window_and_falls_back_when_it_must(backend):
    """Our kernels take no window: a window that hides keys goes to SDPA with a mask, one that hides
    none stays on the kernel. Either way the result is the reference's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]                                    # GQA: 2 k/v heads
    for window in (3, 12, 40):
        out = ops.attention(q, k, v, causal=True, window=window, backend=backend)
        torch.testing.assert_close(out, attention_reference(q, k, v, window=window), **TOL)
    assert not torch.allclose(attention_reference(q, k, v, window=3), attention_reference(q, k, v))


def test_window_gradients_match_the_reference_in_fp64():
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, window=3, backend="torch"), (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: attention_reference(q, k, v, window=3), (q, k, v))


@torch.no_grad()
@pytest.mark.parametrize("t", [12, 40])   # inside the original context / window, and past it
def test_logits_equal_hf(pair, t):
    ours, hf, cfg = pair
    idx = torch.randint(0, cfg.vocab_size, (2, t), generator=torch.Generator().manual_seed(t))
    torch.testing.assert_close(ours(idx)[0], hf(idx).logits, **TOL)


@torch.no_grad()
def test_greedy_generation_past_the_window_and_the_original_context_equals_hf(pair):
    ours, hf, cfg = pair
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]   # ragged: left padding
    rollout = generate(ours, prompts, max_new_tokens=40, temperature=0)
    assert rollout.tokens.shape[1] == 50                          # 50 > 16 (original) and > 6 (window)
    expected = hf.generate(rollout.tokens[:, :10], attention_mask=(rollout.tokens[:, :10] != 0).long(),
                           do_sample=False, max_new_tokens=40, pad_token_id=0, eos_token_id=None)
    assert torch.equal(rollout.tokens, expected)


def test_the_configs_survive_export_and_import(pair, tmp_path):
    ours, hf, cfg = pair
    assert config_from_hf(hf_config(cfg)) == cfg
    assert config_from_hf(hf.config.to_dict()) == cfg             # transformers' own spelling
    loaded = Phi3ForCausalLM.from_pretrained(export_hf(ours, tmp_path / "hf")).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, ours(idx)[0], **TOL)
    hf.save_pretrained(tmp_path / "saved")
    assert import_hf(tmp_path / "saved").config == cfg


def test_bad_long_context_settings_are_refused():
    with pytest.raises(ConfigError, match="head_dim / 2"):
        tiny_config(rope_original_max_len=16, rope_short_factor=[1.0] * 3, rope_long_factor=LONG)
    with pytest.raises(ConfigError, match="need rope_original_max_len"):
        tiny_config(rope_short_factor=SHORT)
    with pytest.raises(ConfigError, match="sliding_window"):
        tiny_config(sliding_window=0)
    d = hf_config(tiny_config(rope_original_max_len=16, rope_short_factor=SHORT, rope_long_factor=LONG))
    d["rope_scaling"]["attention_factor"] = 3.0
    with pytest.raises(MinilmError, match="attention_factor"):
        config_from_hf(d)


@torch.no_grad()
def test_streaming_crosses_the_original_context_like_generate(pair):
    """`stream` (the chat CLI's decoder) rebuilds its cache at the same step as `generate`."""
    from minilm.generate import stream
    ours, _, _ = pair
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    expected = generate(ours, [prompt], max_new_tokens=30, temperature=0).tokens[0, 10:].tolist()
    assert list(stream(ours, prompt, max_new_tokens=30, temperature=0)) == expected
    no_cache = generate(ours, [prompt], max_new_tokens=30, temperature=0, use_cache=False)
    assert no_cache.tokens[0, 10:].tolist() == expected
