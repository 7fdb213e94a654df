"""The memory plan (minilm/memory.py): each term by hand, the meta-device activations against a real
forward, and the total against the measured peak of real training steps (benchmarks/memory_plan.py).

    pytest -m lesson_03 tests/test_memory.py -q
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from minilm.cli import main as cli
from minilm.config import get_preset
from minilm.memory import GIB, activation_bytes, plan_memory
from minilm.model import Phi3
from minilm.ops import loss as cross_entropy_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_plan  # noqa: E402  (benchmarks/memory_plan.py)

pytestmark = pytest.mark.lesson_03


def test_weights_gradients_and_adam_by_hand_and_sharded_by_fsdp():
    cfg = tiny_config()
    n = Phi3(cfg).num_params()
    plan = plan_memory(cfg, 2, 16, dtype="fp32")
    assert (plan.params, plan.trainable) == (n, n)
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * n, 4 * n, 8 * n)   # fp32 master, grad, m and v
    sharded = plan_memory(cfg, 2, 16, dtype="fp32", world=4, fsdp=True)
    assert (sharded.weights, sharded.optimizer) == (n, 2 * n)
    assert sharded.activations == plan.activations            # FSDP shards state, not a GPU's own batch
    assert plan_memory(cfg, 2, 16, dtype="fp32", world=4).weights == 4 * n    # DDP: a full copy each


def test_lora_trains_r_times_in_plus_out_per_adapted_matrix():
    cfg = tiny_config()   # d_model 64, 4 heads of 16, 2 kv heads, d_ff 96, 2 layers
    qkv, o, gate_up, down = (64, 64 + 2 * 32), (64, 64), (64, 2 * 96), (96, 64)
    per_layer = sum(8 * (i + j) for i, j in (qkv, o, gate_up, down))
    plan = plan_memory(cfg, 2, 16, dtype="fp32", lora_r=8)
    assert plan.trainable == 2 * per_layer and plan.gradients == 4 * plan.trainable


def test_kv_cache_and_loss_buffers_by_hand(monkeypatch):
    cfg = tiny_config()
    plan = plan_memory(cfg, 2, 16, dtype="bf16", kv_batch=3, kv_len=64)
    assert plan.kv_cache == 2 * cfg.n_layer * 3 * 64 * cfg.n_kv_head * cfg.head_dim * 2   # k and v, bf16
    fused = cross_entropy_kernel.USE_KERNEL
    assert plan.loss == 2 * 16 * cfg.vocab_size * ((2 + 2) if fused else (2 + 4 + 4))  # logits and their gradient(s)
    monkeypatch.setattr(cross_entropy_kernel, "USE_KERNEL", not fused)  # the other path's buffers
    assert plan_memory(cfg, 2, 16, dtype="bf16").loss == 2 * 16 * cfg.vocab_size * ((2 + 4 + 4) if fused else (2 + 2))


def test_meta_activations_equal_what_a_real_forward_saves():
    cfg = tiny_config()
    model = Phi3(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (3, 24))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    assert activation_bytes(cfg, 3, 24, "fp32") == sum(saved.values())


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    cfg = get_preset("small")
    full = activation_bytes(cfg, 2, 256)
    kept = activation_bytes(cfg, 2, 256, checkpointing=True)
    inputs = cfg.n_layer * 2 * 256 * cfg.d_model * 4
    assert inputs < kept < full / 2


def test_the_plan_is_within_20_percent_of_a_measured_training_peak():
    plan = plan_memory(get_preset("tiny"), 16, 256, dtype="fp32")
    peak = memory_plan.measured_peak("tiny", 16, 256)
    assert 0.8 < peak / plan.total < 1.2, (peak / GIB, plan.total / GIB)


def test_the_memory_command_prints_a_plan(capsys):
    cli(["memory", "--preset", "phi3-mini", "--seq-len", "4096", "--world", "8", "--fsdp", "--checkpointing"])
    out = capsys.readouterr().out
    assert "3,821,079,552 parameters" in out and "8 GPUs (FSDP)" in out and "total per GPU" in out
    with pytest.raises(SystemExit) as e:
        cli(["memory", "--dtype", "fp16"])
    assert e.value.code == 2


def test_the_gpu_speedrun_shards_only_what_does_not_fit_an_80_gb_gpu():
    from minilm.memory import needs_fsdp
    gpu = 79.6 * GIB                                                      # what an H100 80GB reports
    small = plan_memory(get_preset("small"), 32, 512, world=8)            # the gpu preset's model: 5 GiB
    assert not needs_fsdp(small, gpu)
    mini = plan_memory(get_preset("phi3-mini"), 1, 4096, world=8)         # 76 GiB: shard it
    assert needs_fsdp(mini, gpu)
    # with activation checkpointing one replica (60 GiB, 75%) still fits beside its headroom
    assert not needs_fsdp(plan_memory(get_preset("phi3-mini"), 1, 4096, world=8, checkpointing=True), gpu)
