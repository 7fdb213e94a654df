"""minilm's fused attention kernel (csrc/attention/) against the definition in minilm/ops/reference.py.

    pytest -m lesson_04 tests/test_attention_kernel.py -q

float64 gradcheck; forward and gradients against the reference over sequence lengths (1 to 1000,
including the KV-cache case S > T), head dims 32 to 128 and grouped-query ratios 1, 2, 4; bfloat16
by flash-attention's rule (our error against a float64 reference at most twice SDPA's own bfloat16
error); opcheck (schema, autograd and fake registrations); the TORCH_CHECK messages; the whole model
with the kernel against the reference; MINILM_OPS. Skipped when minilm._C is not built.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from minilm.model import Phi3
from minilm.ops import _kernels, attention
from minilm.ops.reference import attention_reference

pytestmark = [pytest.mark.lesson_04, pytest.mark.skipif(
    not _kernels.LOADED, reason=f"minilm._C is not built ({_kernels.LOAD_ERROR})")]
attention_module = importlib.import_module("minilm.ops.attention")


def kernel(q, k, v, causal, scale=None):
    """The raw op: out only, scale 1/sqrt(D) unless given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.minilm.attention_fwd(q, k, v, causal, scale)[0]


def qkv(b, h, h_kv, t, s, d, dtype=torch.float32, requires_grad=True):
    q = torch.randn(b, h, t, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, h_kv, s, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, h_kv, s, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def out_and_grads(fn, q, k, v, grad_out):
    """fn(q, k, v) and the gradients of <fn(q, k, v), grad_out> with respect to q, k, v."""
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# (B, H, H_kv, T, S, D): MHA and GQA 2:1, 4:1, T == S and T < S (a KV cache), two key tiles
@pytest.mark.parametrize("shape", [(2, 2, 2, 5, 5, 8), (1, 4, 2, 6, 6, 16), (1, 4, 1, 3, 9, 8),
                                   (1, 2, 1, 7, 11, 4), (1, 1, 1, 70, 70, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(shape, causal):
    q, k, v = qkv(*shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: kernel(q, k, v, causal), (q, k, v))


# (T, S, D, H, H_kv): every T in {1, 7, 64, 257, 1000}, every D in {32, 64, 80, 96, 128} and every
# GQA ratio in {1, 2, 4} appears, with S == T and S > T; not the whole cross product (runtime)
GRID = [(1, 1, 32, 2, 2), (1, 300, 64, 4, 1), (7, 7, 80, 4, 2), (7, 100, 96, 4, 4), (64, 64, 128, 4, 1),
        (64, 129, 32, 4, 2), (257, 257, 96, 2, 2), (257, 320, 80, 4, 1), (1000, 1000, 64, 2, 1),
        (257, 1000, 128, 2, 2)]


@pytest.mark.parametrize("t, s, d, h, h_kv", GRID)
@pytest.mark.parametrize("causal", [True, False])
def test_float32_matches_reference(t, s, d, h, h_kv, causal):
    q, k, v = qkv(2 if t < 257 else 1, h, h_kv, t, s, d)
    grad_out = torch.randn_like(q)
    ours = out_and_grads(lambda q, k, v: kernel(q, k, v, causal), q, k, v, grad_out)
    ref = out_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=causal),
                        *(x.detach().double().requires_grad_() for x in (q, k, v)), grad_out.double())
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), ours, ref):
        torch.testing.assert_close(a.double(), b, atol=5e-6, rtol=2.5e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("t, s, d, h, h_kv, causal", [(64, 64, 64, 4, 2, True), (7, 7, 128, 2, 2, True),
                                                      (257, 300, 80, 4, 1, True), (100, 100, 32, 4, 4, False)])
def test_bfloat16_error_within_twice_sdpa(t, s, d, h, h_kv, causal):
    """flash-attention's rule: |ours_bf16 - exact| <= 2 |sdpa_bf16 - exact| (+ a small epsilon)."""
    q, k, v = qkv(2, h, h_kv, t, s, d, dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)
    exact = out_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=causal),
                          *(x.detach().double().requires_grad_() for x in (q, k, v)), grad_out.double())
    ours = out_and_grads(lambda q, k, v: kernel(q, k, v, causal), q, k, v, grad_out)
    sdpa = out_and_grads(lambda q, k, v: attention(q, k, v, causal=causal, backend="torch"),
                         q, k, v, grad_out)
    for name, a, b, e in zip(("out", "grad_q", "grad_k", "grad_v"), ours, sdpa, exact):
        ours_err, sdpa_err = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert ours_err <= 2 * sdpa_err + 1e-3, f"{name}: our error {ours_err:.2e}, SDPA's {sdpa_err:.2e}"


def test_opcheck_schema_autograd_and_fake():
    q, k, v = qkv(2, 4, 2, 9, 12, 16)
    torch.library.opcheck(torch.ops.minilm.attention_fwd.default, (q, k, v, True, 0.25))
    torch.library.opcheck(torch.ops.minilm.attention_fwd.default, (q, k, v, False, 0.1))
    out, lse = torch.ops.minilm.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 0.25)
    torch.library.opcheck(torch.ops.minilm.attention_bwd.default, args)


def test_lse_is_the_row_logsumexp_of_scaled_scores():
    q, k, v = qkv(1, 2, 1, 5, 8, 16, requires_grad=False)
    _, lse = torch.ops.minilm.attention_fwd(q, k, v, True, 0.3)
    scores = (q @ k.transpose(-2, -1) * 0.3).masked_fill(torch.ones(5, 8).tril(3) == 0, float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 5)
    torch.testing.assert_close(lse, scores.logsumexp(-1))


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q.half(), k.half(), v.half()), "dtype must be float32, float64 or bfloat16"),
    (lambda q, k, v: (q, k.double(), v), "must share one dtype"),
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q.transpose(1, 2), k, v), "q must be contiguous"),
    (lambda q, k, v: (q[:, :3].contiguous(), k, v), "must be a multiple of k/v heads"),
    (lambda q, k, v: (q, k[..., :8].contiguous(), v[..., :8].contiguous()), "head dim D"),
    (lambda q, k, v: (q, k, v[:, :, :3].contiguous()), "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:, :, :3].contiguous(), v[:, :, :3].contiguous()), "causal needs T <= S"),
])
def test_bad_arguments_are_explained(change, message):
    q, k, v = change(*qkv(1, 4, 2, 4, 6, 16, requires_grad=False))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.minilm.attention_fwd(q, k, v, True, 0.25)


def test_bad_lse_in_backward_is_explained():
    q, k, v = qkv(1, 2, 1, 4, 4, 16, requires_grad=False)
    out, lse = torch.ops.minilm.attention_fwd(q, k, v, True, 0.25)
    with pytest.raises(RuntimeError, match="lse must be a contiguous float32"):
        torch.ops.minilm.attention_bwd(out, q, k, v, out, lse.double(), True, 0.25)


def test_masked_and_unsupported_calls_fall_back_to_sdpa():
    q, k, v = qkv(2, 2, 2, 5, 5, 8, requires_grad=False)
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(attention(q, k, v, key_mask=key_mask, backend="cpu"),
                               attention_reference(q, k, v, key_mask=key_mask), atol=1e-5, rtol=1e-5)
    half = attention(q.half(), k.half(), v.half(), backend="cpu")  # no fp16 CPU kernel: SDPA
    torch.testing.assert_close(half.float(), attention_reference(q, k, v), atol=2e-3, rtol=2e-3)


def test_model_same_logits_and_grads_with_kernel_and_reference(monkeypatch):
    """The whole tiny Phi-3 (GQA 4:2), forward and backward, with each backend."""
    model = Phi3(tiny_config())
    idx = torch.randint(0, 320, (2, 40))
    results = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setattr(attention_module, "BACKEND", backend)
        model.zero_grad()
        logits, loss = model(idx, targets=idx)
        loss.backward()
        results[backend] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_logits, ref_grads), (our_logits, our_grads) = results["reference"], results["cpu"]
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def backend_chosen(value):
    """(returncode, output) of importing minilm.ops with MINILM_OPS=value in a fresh interpreter."""
    code = "import sys, minilm.ops; print(sys.modules['minilm.ops.attention'].BACKEND)"
    env = {**os.environ, "MINILM_OPS": value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    return result.returncode, result.stdout + result.stderr


def test_minilm_ops_forces_a_backend():
    assert attention_module.BACKEND in ("cpu", "cuda") or os.environ.get("MINILM_OPS")  # kernel by default
    for value in ("reference", "cpu"):
        assert backend_chosen(value) == (0, value + "\n")
    missing = "cuda" if "cuda" not in attention_module.available_backends() else "nonsense"
    returncode, output = backend_chosen(missing)
    assert returncode != 0 and f"MINILM_OPS={missing}:" in output
