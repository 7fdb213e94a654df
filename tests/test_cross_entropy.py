"""minilm's fused cross-entropy (csrc/loss/) against the definition in minilm/ops/reference.py and
PyTorch's F.cross_entropy.

    pytest -m lesson_03 tests/test_cross_entropy.py -q

float64 gradcheck with ignored rows; float32 values and gradients equal F.cross_entropy's; bf16 by
flash-attention's rule (our error against a float64 reference at most twice PyTorch's own); the
gradient stays in the logits' dtype; opcheck (schema, autograd and fake registrations); the
TORCH_CHECK messages; the model's loss and gradients with the kernel equal the reference's; on a
GPU the CUDA kernel matches (tests/test_attention_cuda.py compiles every .cu with nvcc). Skipped when minilm._C is not built.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from minilm.model import Phi3
from minilm.ops import _kernels, cross_entropy, loss as loss_module
from minilm.ops.reference import cross_entropy_reference

pytestmark = [pytest.mark.lesson_03, pytest.mark.skipif(
    not _kernels.LOADED, reason=f"minilm._C is not built ({_kernels.LOAD_ERROR})")]
GPU_READY = torch.cuda.is_available() and "cuda" in _kernels.DEVICES


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """Every test here runs the kernel (the library's default is PyTorch's path: MINILM_FUSED_LOSS=1 opts in)."""
    monkeypatch.setattr(loss_module, "USE_KERNEL", True)


def test_the_kernel_is_opt_in():
    code = "import minilm.ops.loss as L; print(L.USE_KERNEL)"
    for value, expected in (("", "False"), ("1", "True")):
        env = {**os.environ, "MINILM_FUSED_LOSS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def logits_and_targets(n, v, dtype=torch.float32, device="cpu", ignored=(1, 4)):
    torch.manual_seed(n * 1000 + v)
    logits = (torch.randn(n, v, dtype=torch.float64) * 4).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(v, (n,), device=device)
    targets[[i for i in ignored if i < n]] = -100
    return logits, targets


def grad_of(fn, logits, targets):
    logits.grad = None
    loss = fn(logits, targets)
    loss.backward()
    return loss.detach(), logits.grad.clone()


def test_float64_gradcheck_with_ignored_rows():
    logits, targets = logits_and_targets(9, 37, torch.float64)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (logits,))


@pytest.mark.parametrize("n, v", [(1, 1), (5, 3), (33, 1000), (64, 8192)])
def test_float32_equals_pytorch(n, v):
    logits, targets = logits_and_targets(n, v)
    ours, g_ours = grad_of(cross_entropy, logits, targets)
    theirs, g_theirs = grad_of(lambda x, t: F.cross_entropy(x, t, ignore_index=-100), logits, targets)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-8)
    if n > 1:
        assert g_ours[1].abs().sum() == 0  # an ignored row gets exactly no gradient


def test_bfloat16_within_twice_pytorchs_error():
    logits, targets = logits_and_targets(128, 2048, torch.bfloat16)
    exact, g_exact = grad_of(cross_entropy_reference, logits.detach().double().requires_grad_(), targets)
    ours, g_ours = grad_of(cross_entropy, logits, targets)
    theirs, g_theirs = grad_of(lambda x, t: F.cross_entropy(x.float(), t), logits, targets)
    assert g_ours.dtype == torch.bfloat16  # written once, in the logits' dtype
    assert (ours.double() - exact).abs() <= 2 * (theirs.double() - exact).abs() + 1e-6
    ours_err = (g_ours.double() - g_exact).abs().max()
    theirs_err = (g_theirs.double() - g_exact).abs().max()
    assert ours_err <= 2 * theirs_err + 1e-9, (ours_err, theirs_err)


def test_all_rows_ignored_is_nan_like_pytorch():
    logits, targets = logits_and_targets(4, 10, ignored=(0, 1, 2, 3))
    assert cross_entropy(logits, targets).isnan() and F.cross_entropy(logits, targets).isnan()


def test_rows_and_lse_of_the_raw_op():
    logits, targets = logits_and_targets(6, 50)
    rows, lse = torch.ops.minilm.cross_entropy_fwd(logits.detach(), targets, -100)
    torch.testing.assert_close(lse, logits.detach().logsumexp(1))
    expected = F.cross_entropy(logits.detach(), targets, reduction="none", ignore_index=-100)
    torch.testing.assert_close(rows, expected)


def test_opcheck_schema_autograd_and_fake():
    logits, targets = logits_and_targets(7, 19)
    torch.library.opcheck(torch.ops.minilm.cross_entropy_fwd.default, (logits, targets, -100))
    rows, lse = torch.ops.minilm.cross_entropy_fwd(logits.detach(), targets, -100)
    torch.library.opcheck(torch.ops.minilm.cross_entropy_bwd.default,
                          (torch.rand_like(rows), logits.detach(), targets, lse, -100))


def test_bad_inputs_are_named():
    fwd = torch.ops.minilm.cross_entropy_fwd
    logits = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="target 7 at row 1 is outside"):
        fwd(logits, torch.tensor([0, 7, 1]), -100)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        fwd(logits, torch.tensor([0, 1, 2], dtype=torch.int32), -100)
    with pytest.raises(RuntimeError, match=r"must be \(N, V\)"):
        fwd(torch.randn(3), torch.tensor([0, 1, 2]), -100)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(torch.randn(5, 3).t(), torch.tensor([0, 1, 2]), -100)
    with pytest.raises(RuntimeError, match="dtype must be"):
        fwd(logits.half(), torch.tensor([0, 1, 2]), -100)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_model_loss_and_gradients_match_the_reference(dtype, monkeypatch):
    """The whole model: Phi3's loss through the kernel vs the reference, same weights, same batch."""
    torch.manual_seed(0)
    model = Phi3(tiny_config())
    idx = torch.randint(model.config.vocab_size, (2, 12))
    targets = torch.roll(idx, -1, 1)
    targets[:, :3] = -100  # e.g. a prompt that is not trained on
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(idx, targets)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours, g_ours = loss_and_grads()
    monkeypatch.setattr(loss_module, "USE_KERNEL", False)
    ref, g_ref = loss_and_grads()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU and minilm._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_pytorch(dtype):
    logits, targets = logits_and_targets(300, 32064, dtype, device="cuda")
    ours, g_ours = grad_of(cross_entropy, logits, targets)
    theirs, g_theirs = grad_of(lambda x, t: F.cross_entropy(x.float(), t), logits, targets)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=2e-2, atol=1e-6)
