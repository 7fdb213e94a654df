"""LoRA: adapters off is the base model exactly, merged equals unmerged, training touches only adapters.

    pytest -m lesson_06 tests/test_lora.py -q
"""

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config

from minilm import MinilmError
from minilm.checkpoint import export_hf, import_hf, load_checkpoint, save_checkpoint
from minilm.lora import (LoRALinear, active_adapters, apply_lora, lora_disabled, lora_parameters, lora_state_dict, merge_and_unload, merge_lora, set_active_adapters, unmerge_lora, use_adapters)
from minilm.lora_io import load_adapters, save_adapters
from minilm.model import Phi3
from minilm.weights import read_weights

pytestmark = pytest.mark.lesson_06


def _idx(b=2, t=12):
    return torch.randint(0, 320, (b, t))


def _train(model, steps=3, lr=1e-2, params=None):
    """A few AdamW steps on random next-token data over the trainable parameters; returns losses."""
    params = params or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    data = _idx(4, 16)
    losses = []
    for _ in range(steps):
        loss = model(data[:, :-1], data[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _randomize_B(model, scale=0.1):
    """Give every adapter a non-zero B, as training would (deterministic under the test seed)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, scale)


@pytest.fixture
def base():
    return Phi3(tiny_config(tie_embeddings=False)).eval()


def test_wrapping_keeps_names_and_parameter_objects(base):
    before = dict(base.named_parameters())
    names = apply_lora(base, targets=("qkv_proj", "down_proj"), r=4)
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.qkv_proj", "mlp.down_proj")]
    after = dict(base.named_parameters())
    assert {k for k in after if "lora_" not in k} == set(before)
    assert all(after[k] is p for k, p in before.items())  # the same Parameter objects, not copies
    assert sorted(k for k in after if "lora_" in k) == sorted(
        f"{n}.lora_{ab}.default" for n in names for ab in "AB")
    assert all(p.requires_grad == ("lora_" in k) for k, p in after.items())  # freeze_base=True


def test_fresh_adapter_is_identity_and_disabled_is_base_after_training(base):
    reference = copy.deepcopy(base)
    idx = _idx()
    expected = reference(idx)[0]
    apply_lora(base, r=8, alpha=16.0)
    assert torch.equal(base(idx)[0], expected)  # B = 0: the adapter adds exactly zero
    _train(base, steps=3)
    assert not torch.allclose(base(idx)[0], expected, atol=1e-4)  # the adapters did learn something
    with lora_disabled(base):
        assert active_adapters(base) == []
        assert torch.equal(base(idx)[0], expected)  # bit for bit the base model
    assert active_adapters(base) == ["default"]  # restored on exit
    assert not torch.equal(base(idx)[0], expected)


def test_training_changes_exactly_the_adapters_and_the_unfrozen_head(base):
    apply_lora(base, r=4, alpha=8.0)
    base.lm_head.weight.requires_grad_(True)  # the one extra parameter we choose to train
    before = {k: v.detach().clone() for k, v in base.named_parameters()}
    losses = _train(base, steps=4)
    assert losses[-1] < losses[0]
    changed = {k for k, v in base.named_parameters() if not torch.equal(v, before[k])}
    trainable = {k for k in before if "lora_" in k} | {"lm_head.weight"}
    assert changed == trainable  # every trainable one moved, every other is bit-identical
    assert {id(p) for p in lora_parameters(base)} == {id(p) for k, p in base.named_parameters() if "lora_" in k}


def test_merge_equals_unmerged_and_unmerge_restores_the_weight(base):
    base = base.double()
    apply_lora(base, r=8, alpha=16.0, adapter="a")
    apply_lora(base, targets="o_proj", r=2, alpha=4.0, adapter="b")
    _randomize_B(base)
    idx = _idx()
    unmerged = base(idx)[0]
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merge_lora(base)
    qkv = base.model.layers[0].self_attn.qkv_proj
    assert not torch.allclose(qkv.weight, weights["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.allclose(base(idx)[0], unmerged, atol=1e-12, rtol=1e-10)  # adapters not added twice
    unmerge_lora(base)
    for k, v in base.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-12, rtol=0), k
    assert torch.allclose(base(idx)[0], unmerged, atol=1e-12, rtol=1e-10)


def test_two_adapters_match_the_math_by_hand():
    net = nn.Sequential(nn.Linear(5, 3))  # bias included: the wrapper must keep it
    W, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    apply_lora(net, targets="0", r=2, alpha=6.0, adapter="a")
    apply_lora(net, targets="0", r=4, alpha=2.0, adapter="b")
    _randomize_B(net, scale=1.0)
    layer = net[0]
    assert isinstance(layer, LoRALinear)
    A, B = layer.lora_A, layer.lora_B
    x = torch.randn(7, 5)
    base = x @ W.T + b
    da = (6.0 / 2) * x @ A["a"].T @ B["a"].T  # s B A x with s = alpha / r
    db = (2.0 / 4) * x @ A["b"].T @ B["b"].T
    expected = {("a",): base + da, ("b",): base + db, ("a", "b"): base + da + db, (): base}
    assert active_adapters(net) == ["a", "b"]  # a new adapter joins the active set
    for names, want in expected.items():
        with use_adapters(net, *names):
            assert torch.allclose(net(x), want, atol=1e-5), names
    outputs = [net(x)]
    for names in [("a",), ("b",)]:
        set_active_adapters(net, list(names))
        outputs.append(net(x))
    assert not any(torch.allclose(p, q) for i, p in enumerate(outputs) for q in outputs[i + 1:])


def test_one_adapter_of_two_equals_a_model_with_only_that_adapter(base):
    only_a = copy.deepcopy(base)
    apply_lora(base, r=4, adapter="actor")
    apply_lora(base, r=4, adapter="critic")
    _randomize_B(base)
    apply_lora(only_a, r=4, adapter="actor")
    only_a.load_state_dict(lora_state_dict(base, "actor"), strict=False)
    idx = _idx()
    with use_adapters(base, "actor"):
        assert torch.equal(base(idx)[0], only_a(idx)[0])
    with use_adapters(base, "critic"):
        assert not torch.allclose(base(idx)[0], only_a(idx)[0], atol=1e-4)


def test_save_and_load_adapters_into_a_fresh_model(base, tmp_path):
    fresh = copy.deepcopy(base)
    apply_lora(base, r=4, alpha=8.0, dropout=0.1, adapter="actor")
    apply_lora(base, targets=r"layers\.1\.", r=2, adapter="critic")
    _train(base, steps=2)
    set_active_adapters(base, ["actor"])
    path = save_adapters(base, tmp_path / "adapters")
    assert sorted(p.name for p in path.iterdir())[0] == "adapter_config.json"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["adapters"]["actor"]["r"] == 4 and config["adapters"]["actor"]["dropout"] == 0.1
    assert config["adapters"]["critic"]["modules"] == [f"model.layers.1.{m}" for m in
                                                       ("self_attn.qkv_proj", "self_attn.o_proj",
                                                        "mlp.gate_up_proj", "mlp.down_proj")]
    assert load_adapters(fresh, path) == ["actor", "critic"]
    assert active_adapters(fresh) == ["actor"]
    idx = _idx()
    for names in [("actor",), ("critic",), ("actor", "critic"), ()]:
        with use_adapters(base, *names), use_adapters(fresh, *names):
            assert torch.equal(base(idx)[0], fresh(idx)[0]), names
    only = save_adapters(base, tmp_path / "critic_only", adapter="critic")
    assert list(json.loads((only / "adapter_config.json").read_text())["adapters"]) == ["critic"]


def test_checkpoint_of_a_merged_lora_model_saves_the_base_and_round_trips(base, tmp_path):
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    apply_lora(base, r=4)
    _train(base, steps=2)
    idx = _idx()
    expected = base(idx)[0]
    heads = {"reward.weight": torch.randn(1, 64), "reward.bias": torch.zeros(1)}
    merge_lora(base)  # saving must still write the unmerged base
    path = save_checkpoint(tmp_path / "ck", base, meta={"stage": "sft"}, extra={"heads": heads})
    weights = read_weights(path)
    assert set(weights) == set(base_weights) and not any("lora_" in k for k in weights)
    for k, v in weights.items():
        assert torch.allclose(v, base_weights[k], atol=1e-6, rtol=0), k
    ck = load_checkpoint(path)
    assert active_adapters(ck.model) == ["default"]
    assert torch.allclose(ck.model(idx)[0], expected, atol=1e-5)
    assert ck.extra.keys() == {"heads"} and all(torch.equal(ck.extra["heads"][k], v) for k, v in heads.items())
    reference = Phi3(base.config).eval()
    reference.load_state_dict(base_weights)
    with lora_disabled(ck.model):
        assert torch.allclose(ck.model(idx)[0], reference(idx)[0], atol=1e-5)


def test_checkpoint_round_trip_is_exact_when_unmerged(base, tmp_path):
    apply_lora(base, r=4, adapter="actor")
    apply_lora(base, targets="o_proj", r=2, adapter="critic")
    _train(base, steps=2)
    set_active_adapters(base, "critic")
    path = save_checkpoint(tmp_path / "ck", base)
    ck = load_checkpoint(path)
    assert ck.extra == {}
    assert active_adapters(ck.model) == ["critic"]  # active as saved
    idx = _idx()
    assert torch.equal(ck.model.eval()(idx)[0], base(idx)[0])
    for k, v in base.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert [k for k, p in ck.model.named_parameters() if p.requires_grad] == [
        k for k in base.state_dict() if "lora_" in k]


def test_export_hf_folds_the_active_adapters(base, tmp_path):
    apply_lora(base, r=4)
    _randomize_B(base)
    idx = _idx()
    exported = import_hf(export_hf(base, tmp_path / "hf")).eval()
    assert torch.allclose(exported(idx)[0], base(idx)[0], atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())


# ---- bad input gives a clear error --------------------------------------------------------------

def test_unknown_target_lists_the_linear_layers(base):
    with pytest.raises(MinilmError) as e:
        apply_lora(base, targets=("q_proj",))
    assert "'q_proj' matches no nn.Linear" in str(e.value)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        assert name in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # nothing half-applied


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_must_be_a_positive_integer(base, r):
    with pytest.raises(MinilmError, match="rank r must be a positive integer"):
        apply_lora(base, r=r)


@pytest.mark.parametrize("kwargs, words", [
    (dict(alpha=0.0), "alpha must be > 0"), (dict(dropout=1.0), "dropout must be in"),
    (dict(adapter="my.adapter"), "adapter name"), (dict(targets="("), "not a valid regex")])
def test_other_bad_arguments(base, kwargs, words):
    with pytest.raises(MinilmError, match=words):
        apply_lora(base, **kwargs)


def test_same_adapter_twice_on_a_layer(base):
    apply_lora(base, targets="o_proj", adapter="a")
    with pytest.raises(MinilmError, match="already on model.layers.0.self_attn.o_proj"):
        apply_lora(base, targets=("qkv_proj", "o_proj"), adapter="a")
    assert not isinstance(base.model.layers[0].self_attn.qkv_proj, LoRALinear)  # checked before changing
    apply_lora(base, targets="qkv_proj", adapter="a")  # same name on other layers is fine
    with pytest.raises(MinilmError, match="already exists with r=8"):
        apply_lora(base, targets="down_proj", adapter="a", r=4)


def test_merge_errors_and_switching_while_merged(base):
    with pytest.raises(MinilmError, match="no LoRA adapters"):
        merge_lora(base)
    with pytest.raises(MinilmError, match="no LoRA adapters"):
        with lora_disabled(base):
            pass
    apply_lora(base, adapter="a")
    apply_lora(base, adapter="b")
    with pytest.raises(MinilmError, match="not merged"):
        unmerge_lora(base)
    with pytest.raises(MinilmError, match=r"unknown adapter\(s\) \['c'\]"):
        set_active_adapters(base, ["c"])
    merge_lora(base)
    with pytest.raises(MinilmError, match="already merged"):
        merge_lora(base)
    for switch in (lambda: set_active_adapters(base, ["a"]), lambda: lora_disabled(base).__enter__()):
        with pytest.raises(MinilmError, match="unmerge_lora"):
            switch()
    assert active_adapters(base) == ["a", "b"]
    with use_adapters(base, "b", "a"):  # the same set as merged is allowed
        pass
    unmerge_lora(base)
    with use_adapters(base, "a"):
        pass


def test_merge_and_export_refuse_a_tied_lm_head(tmp_path):
    model = Phi3(tiny_config(tie_embeddings=True))
    apply_lora(model, targets="lm_head")
    with pytest.raises(MinilmError, match="tied"):
        merge_lora(model)
    with pytest.raises(MinilmError, match="tied"):
        export_hf(model, tmp_path / "hf")
    with lora_disabled(model):
        export_hf(model, tmp_path / "hf")  # nothing to fold: fine
    save_checkpoint(tmp_path / "ck", model)  # checkpoints keep the adapters apart: fine
    assert load_checkpoint(tmp_path / "ck").model.lm_head.weight is not None


def test_bad_adapter_files_and_extras(base, tmp_path):
    with pytest.raises(MinilmError, match="no adapter_config.json"):
        load_adapters(base, tmp_path)
    other = Phi3(tiny_config(tie_embeddings=False))
    apply_lora(other, r=4)
    path = save_adapters(other, tmp_path / "r4")
    apply_lora(base, r=2)  # the same adapter name, another rank
    with pytest.raises(MinilmError, match=r"do not fit the model: .*lora_A.default \(4, 64\) != \(2, 64\)"):
        load_adapters(base, path)
    with pytest.raises(MinilmError, match="extra name 'model'"):
        save_checkpoint(tmp_path / "ck", base, extra={"model": {}})
    with pytest.raises(MinilmError, match="must be a dict of tensors"):
        save_checkpoint(tmp_path / "ck", base, extra={"heads": {"w": 1.0}})


def test_merge_and_unload_makes_the_adapted_model_the_new_base(base):
    apply_lora(base, r=4, adapter="sft")
    _randomize_B(base)
    idx = _idx()
    expected = base(idx)[0]
    merge_and_unload(base)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    assert not any("lora_" in k for k in base.state_dict())
    assert all(p.requires_grad for p in base.parameters())  # a plain model again
    assert torch.allclose(base(idx)[0], expected, atol=1e-5)
    apply_lora(base, r=4, adapter="dpo")  # a fresh adapter on the folded base: reference = SFT model
    with lora_disabled(base):
        assert torch.allclose(base(idx)[0], expected, atol=1e-5)


def test_adapter_dropout_acts_in_train_mode_only(base):
    apply_lora(base, r=4, dropout=0.5)
    _randomize_B(base)
    idx = _idx()
    assert torch.equal(base(idx)[0], base(idx)[0])  # eval mode (the fixture's) is kept
    base.train()
    assert not torch.equal(base(idx)[0], base(idx)[0])
    with lora_disabled(base):
        assert torch.equal(base(idx)[0], base(idx)[0])  # tiny_config has dropout 0: base is exact
