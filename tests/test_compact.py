"""Compaction (minilm/prune/compact.py): a neuron-masked model becomes a smaller dense model that
computes the same function, with per-layer FFN widths in its config, saved and loaded by the
checkpoint code and exported to Hugging Face padded back to one width.

    pytest -m lesson_11 tests/test_compact.py -q
"""

import pytest
import torch
from conftest import tiny_config

from minilm import MinilmError
from minilm.checkpoint import export_hf, hf_config, import_hf, load_checkpoint, save_checkpoint
from minilm.config import ConfigError, ModelConfig
from minilm.model import Phi3, get_neuron_masks, set_neuron_masks
from minilm.prune.compact import compact_model, compacted_widths

pytestmark = pytest.mark.lesson_11
# fp32 against HF: our attention kernel sums in another order than HF's SDPA (tests/test_hf_parity.py)
HF_TOL = dict(rtol=1e-5, atol=1e-4)


def masked_model(dtype=torch.float64, tie=True, seed=0):
    """A tiny model with large random weights (so a wrong neuron shows) and masks on every layer:
    layer 0 keeps about half, layer 1 a quarter, layer 2 none, layer 3 is left whole (None)."""
    torch.manual_seed(seed)
    cfg = tiny_config(n_layer=4, tie_embeddings=tie)
    model = Phi3(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    masks = [(torch.rand(cfg.d_ff) < density).to(dtype) for density in (0.5, 0.25, 0.0)] + [None]
    set_neuron_masks(model, masks)
    return model, masks


def test_compacted_model_equals_masked_model_float64():
    model, masks = masked_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        masked = model(idx)[0]
        small = compact_model(model)
        compacted = small(idx)[0]
        set_neuron_masks(model, [None if m is None else m.clone().requires_grad_() for m in masks])
        multiplied = model(idx)[0]  # the reference: every neuron, pruned ones times zero
    torch.testing.assert_close(compacted, masked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compacted, multiplied, rtol=1e-12, atol=1e-12)
    set_neuron_masks(model, [None] * 4)
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0], masked)  # the masks mattered


def test_widths_weights_and_config():
    model, masks = masked_model()
    small = compact_model(model)
    d_ff = model.config.d_ff
    widths = tuple(int(m.sum()) for m in masks[:3]) + (d_ff,)
    assert small.config.d_ff_per_layer == widths == compacted_widths(model)
    assert widths[2] == 0 and 0 < widths[1] < widths[0] < d_ff
    assert small.config.d_ff == d_ff and small.config.ffn_width(3) == d_ff
    for i, layer in enumerate(small.model.layers):
        assert layer.mlp.gate_up_proj.weight.shape == (2 * widths[i], model.config.d_model)
        assert layer.mlp.down_proj.weight.shape == (model.config.d_model, widths[i])
        assert layer.mlp.neuron_mask is None
    kept = masks[0].nonzero().flatten()
    assert torch.equal(small.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight[:, kept])
    assert small.num_params() == model.num_params() - 3 * model.config.d_model * sum(d_ff - w for w in widths)
    assert small.lm_head.weight is small.model.embed_tokens.weight
    assert get_neuron_masks(model) == masks  # the source model is left as it was
    assert small.model.embed_tokens.weight.dtype == torch.float64


def test_compacted_model_trains():
    model, _ = masked_model(dtype=torch.float32)
    small = compact_model(model).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    _, loss = small(idx, targets=idx)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in small.parameters())


def test_checkpoint_round_trip_of_compacted_model(tmp_path):
    model, _ = masked_model(dtype=torch.float32)
    small = compact_model(model)
    save_checkpoint(tmp_path / "ckpt", small)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == small.config and loaded.config.d_ff_per_layer == small.config.d_ff_per_layer
    assert isinstance(loaded.config.d_ff_per_layer, tuple)
    for (name, a), (_, b) in zip(small.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    dense = Phi3(tiny_config(n_layer=4))
    with pytest.raises(MinilmError, match="model.layers.0.mlp.gate_up_proj.weight is"):  # widths checked on load
        from minilm.checkpoint import load_weights
        load_weights(dense, small.state_dict())


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_pads_and_transformers_agrees(tmp_path, tie):
    transformers = pytest.importorskip("transformers", reason="test-only extra transformers not installed")
    model, _ = masked_model(dtype=torch.float32, tie=tie)
    small = compact_model(model)
    assert hf_config(small.config)["intermediate_size"] == max(small.config.d_ff_per_layer)
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = small(idx)[0]
        for source in (small, model):  # compacted, and masked (masks folded into the weights)
            out = export_hf(source, tmp_path / f"hf-{id(source)}")
            hf = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
            assert hf.config.intermediate_size == model.config.d_ff
            torch.testing.assert_close(hf(idx).logits, expected, **HF_TOL)
            back = import_hf(out).eval()  # a dense model of the padded width, same function
            torch.testing.assert_close(back(idx)[0], expected, **HF_TOL)


@pytest.mark.parametrize("widths, message", [
    ((96, 96), "has 2 widths but n_layer=4"),
    ((96, -1, 3, 4), "non-negative integers; layer 1 has -1"),
    ((96, 2.5, 3, 4), "layer 1 has 2.5"),
    ((96, True, 3, 4), "layer 1 has True"),
    (96, "one FFN width per layer"),
])
def test_config_validation(widths, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(n_layer=4, d_ff_per_layer=widths)


def test_config_widths_round_trip_through_dict():
    cfg = tiny_config(n_layer=3, d_ff_per_layer=[5, 0, 96])  # a list, as JSON gives it back
    assert cfg.d_ff_per_layer == (5, 0, 96) and [cfg.ffn_width(i) for i in range(3)] == [5, 0, 96]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert tiny_config().ffn_width(1) == 96
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        cfg.ffn_width(3)


def test_compact_model_bad_masks():
    model, masks = masked_model()
    with pytest.raises(MinilmError, match="got 2 masks for 4 layers"):
        compact_model(model, masks[:2])
    with pytest.raises(ValueError, match="exactly 0 \\(pruned\\) or 1"):
        compact_model(model, [masks[0] * 0.5, None, None, None])
