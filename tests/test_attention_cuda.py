"""minilm's CUDA attention kernels (csrc/attention/attention_cuda.cu) against the fp64 reference.

    pytest -m lesson_04 tests/test_attention_cuda.py          # nvcc compile check (no GPU needed)
    pytest -m "gpu and lesson_04" tests/test_attention_cuda.py  # the kernels, on a CUDA GPU

Tolerance is FlashAttention's rule: against attention_reference in float64, our max error in
fp16/bf16 may be at most about twice that of PyTorch's scaled_dot_product_attention at the same
dtype, for the output and for every gradient.
"""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minilm.ops import attention
from minilm.ops.reference import attention_mask, attention_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))

pytestmark = pytest.mark.lesson_04


def _cuda_kernels_built() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import minilm._C  # noqa: F401  (registers torch.ops.minilm)
        return torch._C._dispatch_has_kernel_for_dispatch_key("minilm::attention_fwd", "CUDA")
    except (ImportError, RuntimeError):
        return False


GPU_READY = _cuda_kernels_built()


def gpu(test):
    """Mark a test `gpu`, and skip it unless there is a GPU and minilm._C has the CUDA kernels."""
    skip = pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU and minilm._C built with CUDA")
    return pytest.mark.gpu(skip(test))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    """The .cu files are torch-free, so nvcc alone compiles them (one call for both archs: 10-20 s)."""
    cmd = ["nvcc", "-c", "-std=c++17", "-O2", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", str(source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"


def _qkv(b, h, h_kv, t, s, d, dtype):
    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)
    return randn(b, h, t, d), randn(b, h_kv, s, d), randn(b, h_kv, s, d), randn(b, h, t, d)


def _lse_reference(q, k, causal, scale):
    """(B, H, T) logsumexp of the masked, scaled scores."""
    t, s = q.shape[2], k.shape[2]
    scores = q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-2, -1) * scale
    mask = attention_mask(t, s, causal, None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.logsumexp(dim=-1)


def _assert_within_budget(name, ours, theirs, ref64):
    """FlashAttention's rule: our error vs fp64 <= 2 x PyTorch's error vs fp64 (+ a tiny floor)."""
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (theirs.double() - ref64).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-4, \
        f"{name}: max error {ours_err:.3g} vs fp64, PyTorch SDPA's is {torch_err:.3g}"


@gpu
@pytest.mark.parametrize("t, s", [(1, 1), (1, 77), (7, 7), (7, 130), (64, 64), (64, 100), (257, 257),
                                  (257, 300), (1000, 1000), (1000, 1031)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernels_match_reference(dtype, causal, group, d, t, s):
    b, h_kv = 2, 2
    h, scale = h_kv * group, 1 / math.sqrt(d)
    q, k, v, grad_out = _qkv(b, h, h_kv, t, s, d, dtype)

    # the truth: the definition in float64
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    out64 = attention_reference(q64, k64, v64, causal=causal, scale=scale)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    # the error budget: PyTorch's SDPA at the same precision
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out_torch = attention(qt, kt, vt, causal=causal, scale=scale, backend="torch")
    grads_torch = torch.autograd.grad(out_torch, (qt, kt, vt), grad_out)
    # ours
    out, lse = torch.ops.minilm.attention_fwd(q, k, v, causal, scale)
    grads = torch.ops.minilm.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, t)
    _assert_within_budget("out", out, out_torch, out64)
    torch.testing.assert_close(lse.double(), _lse_reference(q64.detach(), k64.detach(), causal, scale),
                               atol=1e-3, rtol=1e-4)
    for name, ours, theirs, ref in zip(("grad_q", "grad_k", "grad_v"), grads, grads_torch, grads64):
        assert ours.shape == ref.shape and ours.dtype == dtype
        _assert_within_budget(name, ours, theirs, ref)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_misaligned_views_give_the_same_result(causal):
    """A contiguous view at an odd offset is copied to 16-byte aligned memory by the binding."""
    q, k, v, grad_out = _qkv(1, 4, 2, 33, 40, 64, torch.float16)
    shifted = []
    for x in (q, k, v):
        buf = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
        view = buf[1:].view(x.shape)  # contiguous, 2 bytes past an aligned address
        view.copy_(x)
        shifted.append(view)
    out, lse = torch.ops.minilm.attention_fwd(q, k, v, causal, 0.125)
    out2, lse2 = torch.ops.minilm.attention_fwd(*shifted, causal, 0.125)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)
    grads = torch.ops.minilm.attention_bwd(grad_out, q, k, v, out, lse, causal, 0.125)
    grads2 = torch.ops.minilm.attention_bwd(grad_out, *shifted, out, lse, causal, 0.125)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, atol=1e-2, rtol=1e-2)  # dQ atomics add in any order


@gpu
def test_bad_inputs_are_explained():
    q, k, v, _ = _qkv(1, 2, 2, 8, 8, 64, torch.float16)
    fwd = torch.ops.minilm.attention_fwd
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        fwd(q.float(), k.float(), v.float(), False, 0.125)
    with pytest.raises(RuntimeError, match="head dim 32"):
        fwd(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), False, 0.125)
    with pytest.raises(RuntimeError, match="T <= S"):
        fwd(q, k[:, :, :4].contiguous(), v[:, :, :4].contiguous(), True, 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, False, 0.125)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        fwd(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), False, 0.125)


@gpu
@pytest.mark.parametrize("dtype, causal, group, d, t, s", [
    (torch.float16, True, 2, 64, 7, 9),
    (torch.bfloat16, False, 1, 128, 70, 70),
])
def test_opcheck(dtype, causal, group, d, t, s):
    """Schema, fake (meta) kernels and autograd registration agree with the CUDA kernels."""
    q, k, v, grad_out = _qkv(1, 2 * group, 2, t, s, d, dtype)
    scale = 1 / math.sqrt(d)
    out, lse = torch.ops.minilm.attention_fwd(q, k, v, causal, scale)
    torch.library.opcheck(torch.ops.minilm.attention_bwd.default, (grad_out, q, k, v, out, lse, causal, scale))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.minilm.attention_fwd.default, (q, k, v, causal, scale))



@gpu
def test_autograd_through_minilm_ops_attention():
    """attention(backend="cuda") differentiates through attention_bwd (registered in minilm/ops/_kernels.py)."""
    q, k, v, grad_out = _qkv(2, 4, 2, 100, 100, 64, torch.bfloat16)
    out_op, lse = torch.ops.minilm.attention_fwd(q, k, v, True, 64 ** -0.5)
    grads_op = torch.ops.minilm.attention_bwd(grad_out, q, k, v, out_op, lse, True, 64 ** -0.5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal=True, backend="cuda")
    out.backward(grad_out)
    torch.testing.assert_close(out, out_op, atol=0, rtol=0)
    for x, g in zip((q, k, v), grads_op):
        torch.testing.assert_close(x.grad, g, atol=1e-2, rtol=1e-2)  # dQ atomics add in any order
