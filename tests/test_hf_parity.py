"""Our Phi-3 against Hugging Face's `Phi3ForCausalLM`, the trusted reference (lessons/01_transformer.md).

Both models are built from the same tiny random config, locally (no download), and hold the same
weights: our parameter names *are* HF's, so one state dict loads into both. Then logits, loss,
greedy generations and KV-cache decoding must agree, and a checkpoint must survive the trip
through `export_hf` / `from_pretrained` and `save_pretrained` / `import_hf`.

    pytest -m lesson_01 tests/test_hf_parity.py -q
"""

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="test-only extra transformers not installed")
from conftest import tiny_config
from transformers import Phi3Config, Phi3ForCausalLM

from minilm import MinilmError
from minilm.checkpoint import config_from_hf, export_hf, hf_config, import_hf
from minilm.config import get_preset
from minilm.generate import generate, left_pad
from minilm.model import KVCache, Phi3

pytestmark = pytest.mark.lesson_01

# fp32: exactly 0 difference with MINILM_OPS=torch (SDPA, what HF runs); our kernel (the default
# when built) and MINILM_OPS=reference sum in another order and differ by ~1e-5 on logits of size ~10
TOL = dict(rtol=1e-5, atol=1e-4)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24]]  # ragged: rows get left padding

# MHA (n_kv_head == n_head) and GQA (2 query heads per k/v head), each with untied and tied head.
# rope_theta and norm_eps are off their defaults so a dropped field would show up as a mismatch.
SHAPES = {
    "mha-untied": dict(n_kv_head=4, tie_embeddings=False),
    "gqa-untied": dict(n_kv_head=2, tie_embeddings=False),
    "mha-tied": dict(n_kv_head=4, tie_embeddings=True),
    "gqa-tied": dict(n_kv_head=2, tie_embeddings=True),
}


def phi3_config(cfg) -> Phi3Config:
    """The HF config for our ModelConfig, written out by hand (independently of `hf_config`)."""
    return Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_seq_len,
        original_max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=None, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    """(ours, hf, cfg): the two models with identical, deliberately large random weights."""
    cfg = tiny_config(rope_theta=500.0, norm_eps=1e-6, **SHAPES[request.param])
    g = torch.Generator().manual_seed(1234)
    hf = Phi3ForCausalLM(phi3_config(cfg)).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives near-zero logits that would hide bugs
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = Phi3(cfg).eval()
    ours.load_state_dict(hf.state_dict())  # strict: every name and shape must match
    return ours, hf, cfg


def padded_batch():
    """PROMPTS left-padded, plus positions that count only real tokens (what HF's generate does)."""
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return tokens, mask, positions


def test_same_parameter_names_and_shapes(pair):
    ours, hf, cfg = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in hf.state_dict().items()}
    assert config_from_hf(phi3_config(cfg).to_dict()) == cfg
    if cfg.tie_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@torch.no_grad()
def test_logits_equal(pair):
    ours, hf, cfg = pair
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    logits, _ = ours(idx)
    assert logits.abs().max() > 1.0  # weights large enough that a mismatch would show
    torch.testing.assert_close(logits, hf(idx).logits, **TOL)


@torch.no_grad()
def test_loss_equal(pair):
    """HF shifts `labels` inside the model; our `targets` are already the next tokens."""
    ours, hf, cfg = pair
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    labels = idx.clone()
    labels[0, :5] = -100  # e.g. a prompt that is not trained on
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    _, loss = ours(idx, targets)
    torch.testing.assert_close(loss, hf(idx, labels=labels).loss, **TOL)


@torch.no_grad()
def test_left_padded_logits_equal(pair):
    """With an attention mask, padding is invisible and positions start at each row's first token."""
    ours, hf, _ = pair
    tokens, mask, positions = padded_batch()
    logits, _ = ours(tokens, attention_mask=mask)
    expected = hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], **TOL)


@torch.no_grad()
def test_greedy_generation_equal(pair):
    ours, hf, _ = pair
    tokens, mask, _ = padded_batch()
    rollout = generate(ours, PROMPTS, max_new_tokens=8, temperature=0)
    expected = hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=8,
                           pad_token_id=0, eos_token_id=None)
    assert torch.equal(rollout.tokens, expected)
    assert rollout.gen_mask[:, tokens.shape[1]:].all()


@torch.no_grad()
def test_kv_cache_decoding_equal(pair):
    """Prefill 5 columns, then one token at a time: each step's logits equal HF's full forward.

    In float64: one query at a time sums in a different order than a full forward, which costs
    ~1e-5 in float32; in float64 any remaining difference would be a real bug.
    """
    ours, hf, cfg = pair
    ours, hf = copy.deepcopy(ours).double(), copy.deepcopy(hf).double()
    tokens, mask, _ = padded_batch()
    extra = torch.randint(1, cfg.vocab_size, (len(PROMPTS), 4))
    tokens = torch.cat([tokens, extra], dim=1)
    mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(cfg, batch_size=len(PROMPTS), max_len=tokens.shape[1], dtype=torch.float64)
    steps = [ours(tokens[:, :5], kv_cache=cache, attention_mask=mask[:, :5])[0]]
    for t in range(5, tokens.shape[1]):
        steps.append(ours(tokens[:, t:t + 1], kv_cache=cache, attention_mask=mask[:, :t + 1])[0])
    assert cache.length == tokens.shape[1]
    logits = torch.cat(steps, dim=1)
    expected = hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_export_hf_loads_in_transformers(pair, tmp_path):
    ours, _, cfg = pair
    out = export_hf(ours, tmp_path / "hf")
    loaded = Phi3ForCausalLM.from_pretrained(out).eval()
    assert loaded.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert loaded.config.tie_word_embeddings == cfg.tie_embeddings
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(loaded(idx).logits, ours(idx)[0], **TOL)


@torch.no_grad()
def test_import_hf_reads_save_pretrained(pair, tmp_path):
    _, hf, cfg = pair
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf").eval()
    assert model.config == cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(model(idx)[0], hf(idx).logits, **TOL)


UNSUPPORTED = {  # what a config.json may hold that our model does not implement -> words in the error
    "yarn (rope_scaling)": (lambda d: d.update(rope_scaling={"type": "yarn", "factor": 4.0}), "'yarn'"),
    "dynamic (rope_parameters)": (lambda d: d.update(rope_parameters={"rope_type": "dynamic"}), "'dynamic'"),
    "longrope without its factors": (lambda d: d.update(rope_scaling={"type": "longrope"}), "short_factor"),
    "partial rotary": (lambda d: d.update(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    "gelu": (lambda d: d.update(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh'"),
    "not phi3": (lambda d: d.update(model_type="llama"), "'llama' is not phi3"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_config_from_hf_rejects_unsupported(case):
    edit, words = UNSUPPORTED[case]
    d = hf_config(tiny_config())
    assert config_from_hf(d) == tiny_config()  # the unedited dict is accepted
    edit(d)
    with pytest.raises(MinilmError, match="not supported|phi3|needs short_factor") as e:
        config_from_hf(d)
    assert words in str(e.value)


def test_phi3_mini_parameter_count_matches_hf_on_meta():
    """3,821,079,552 parameters, counted without allocating them (the meta device has no storage)."""
    cfg = get_preset("phi3-mini")
    with torch.device("meta"):
        ours = Phi3(cfg)
        hf = Phi3ForCausalLM(Phi3Config())  # HF's defaults are phi-3-mini
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 3_821_079_552
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in hf.state_dict().items()}
    # by hand (lessons/01_transformer.md): embeddings + head, 32 layers, final norm
    d, v, f, layers = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.n_layer
    qkv = d * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    per_layer = qkv + d * d + d * 2 * f + f * d + 2 * d
    assert 2 * v * d + layers * per_layer + d == 3_821_079_552
