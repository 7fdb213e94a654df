"""minilm.runtime decides device and dtype in one place (lesson 03): bf16 autocast where the chip has
native bf16, float32 elsewhere, either one forced with dtype="bf16" / "fp32"."""

import pytest
import torch

from minilm import MinilmError
from minilm import runtime
from minilm.runtime import setup_runtime

pytestmark = pytest.mark.lesson_03


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_whether_the_cpu_has_native_bf16(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    rt = setup_runtime("cpu")
    assert rt.autocast_dtype == (torch.bfloat16 if native else None)


def test_a_forced_dtype_wins_over_the_chip(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert setup_runtime("cpu", "fp32").autocast_dtype is None
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert setup_runtime("cpu", "bf16").autocast_dtype == torch.bfloat16


def test_autocast_runs_matmuls_in_bf16_and_keeps_weights_float32():
    rt = setup_runtime("cpu", "bf16")
    layer = torch.nn.Linear(4, 3)
    with rt.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with setup_runtime("cpu", "fp32").autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_an_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(MinilmError, match="unknown dtype 'fp16'; use auto, bf16, fp32"):
        setup_runtime("cpu", "fp16")


def test_the_capability_probe_asks_torch_and_answers_a_bool():
    assert isinstance(runtime.cpu_has_bf16(), bool)
