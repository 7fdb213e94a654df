"""The Phi-3 model's pieces against hand-computed references (lesson 01)."""

import math

import pytest
import torch
from conftest import tiny_config

from minilm.config import ConfigError, ModelConfig, get_preset
from minilm.model import KVCache, Phi3, RMSNorm, apply_rope, rope_tables

pytestmark = pytest.mark.lesson_01


def test_rmsnorm_matches_definition():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_float32_call_is_the_written_out_arithmetic_bit_for_bit():
    """float32 takes F.rms_norm (one call); it must equal the explicit formula in every bit, forward and
    backward, or a run's numbers would change with it."""
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96)
    x = (3 * torch.randn(4, 77, 96)).requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    y = norm(x)
    y_ref = w_ref * (x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5))
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, w_ref.grad)


def test_rope_rotates_pairs_and_keeps_norm():
    cos, sin = rope_tables(head_dim=4, max_len=8, theta=10000.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    pos = 3
    out = apply_rope(x, cos[pos].view(1, 1, 1, 4), sin[pos].view(1, 1, 1, 4))
    # dims (0, 2) form one pair rotated by angle pos * theta^0 = 3 radians
    torch.testing.assert_close(out.flatten(), torch.tensor([math.cos(3), 0.0, math.sin(3), 0.0]))
    y = torch.randn(2, 3, 8, 4)
    rotated = apply_rope(y, cos.view(1, 1, 8, 4), sin.view(1, 1, 8, 4))
    torch.testing.assert_close(rotated.norm(dim=-1), y.norm(dim=-1))


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(head_dim=8, max_len=32, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        rq = apply_rope(q.view(1, 1, 1, 8), cos[i].view(1, 1, 1, 8), sin[i].view(1, 1, 1, 8))
        rk = apply_rope(k.view(1, 1, 1, 8), cos[j].view(1, 1, 1, 8), sin[j].view(1, 1, 1, 8))
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))


def test_forward_shapes_and_initial_loss_near_uniform():
    cfg = tiny_config()
    model = Phi3(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, loss = model(idx, torch.randint(0, cfg.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert model.hidden(idx).shape == (2, 16, cfg.d_model)
    # small random init: predictions are close to uniform, so the loss is close to ln(vocab)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_ignore_index_excludes_tokens_from_loss():
    cfg = tiny_config()
    model = Phi3(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    targets = idx.clone()
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])
    torch.testing.assert_close(loss, expected)


def test_parameter_names_are_hugging_face_names():
    names = set(Phi3(tiny_config(n_layer=1, tie_embeddings=False)).state_dict())
    assert names == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    }


def test_tied_embeddings_share_one_tensor():
    model = Phi3(tiny_config(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = Phi3(tiny_config(tie_embeddings=False))
    assert untied.num_params() == model.num_params() + model.lm_head.weight.numel()


def test_phi3_mini_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Phi3(get_preset("phi3-mini"))
    assert model.num_params() == 3_821_079_552


def test_small_preset_is_20_to_30m_parameters():
    with torch.device("meta"):
        assert 20e6 <= Phi3(get_preset("small")).num_params() <= 30e6


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_equals_full_forward(n_kv_head):
    cfg = tiny_config(n_kv_head=n_kv_head)
    model = Phi3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    full, _ = model(idx)
    cache = KVCache(cfg, batch_size=2)
    pieces = [model(idx[:, :7], kv_cache=cache)[0]]
    for t in range(7, 12):  # then one token at a time, as decoding does
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_left_padding_with_mask_equals_unpadded():
    cfg = tiny_config()
    model = Phi3(cfg).eval()
    idx = torch.randint(1, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(model(padded, attention_mask=mask)[0][:, 3:], model(idx)[0],
                               atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    cfg = tiny_config(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        Phi3(cfg)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=64, n_head=3), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not a multiple of n_kv_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**fields)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("huge")


def test_config_round_trips_through_dict():
    cfg = get_preset("small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_experts": 8})
