"""minilm's neuron-masked FFN (csrc/masking/, minilm/ops/masking.py) against its references.

    pytest -m lesson_11 tests/test_masking.py -q

Three computations of the pruned FFN must agree: the reference (every neuron, pruned ones times 0),
our kernel (kept neurons only) and the compacted weights (a smaller dense FFN); forward and
gradients, float64 gradcheck, bfloat16 by the flash-attention rule (our error against float64 at
most twice the reference's own bfloat16 error). With every neuron kept the kernel is bit-for-bit
the dense MLP; with none it returns zeros. Bad inputs give messages that say what is wrong.
The model routes masks to the kernel (or to act * mask when the mask needs a gradient).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from minilm.model import MLP, Phi3, get_neuron_masks, set_neuron_masks
from minilm.ops import _kernels, compact_ffn, masked_ffn
from minilm.ops.reference import ffn_compact_reference, masked_ffn_reference

pytestmark = pytest.mark.lesson_11
needs_kernel = pytest.mark.skipif(not _kernels.LOADED, reason=f"minilm._C is not built ({_kernels.LOAD_ERROR})")
GPU_READY = torch.cuda.is_available() and "cuda" in _kernels.DEVICES


def ffn(d=16, f=24, density=0.5, dtype=torch.float64, lead=(3, 5), seed=0, device="cpu"):
    """x (*lead, d), gate_up (2f, d), down (d, f), all requiring grad, and a mask keeping ~density."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    mask = (torch.rand(f, generator=g) < density).to(device, dtype)
    return randn(*lead, d), randn(2 * f, d), randn(d, f), mask


def dense_compacted(x, gate_up, down, mask):
    """The FFN of the compacted weights: a plain dense SwiGLU of width K."""
    gu, dn = compact_ffn(gate_up, down, mask)
    gate, up = F.linear(x, gu).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, dn)


def grads(fn, x, gate_up, down, mask, grad_out):
    out = fn(x, gate_up, down, mask)
    return (out, *torch.autograd.grad(out, (x, gate_up, down), grad_out))


@needs_kernel
@pytest.mark.parametrize("density", [1.0, 0.75, 0.5, 0.25, 0.0])
@pytest.mark.parametrize("lead", [(7,), (2, 3, 4)])
def test_kernel_equals_reference_and_compacted(density, lead):
    x, gate_up, down, mask = ffn(density=density, lead=lead)
    grad_out = torch.randn(*lead, 16, dtype=torch.float64)
    kernel = grads(lambda *a: masked_ffn(*a, backend="kernel"), x, gate_up, down, mask, grad_out)
    reference = grads(masked_ffn_reference, x, gate_up, down, mask, grad_out)
    compacted = grads(dense_compacted, x, gate_up, down, mask, grad_out)
    for ours, ref, comp in zip(kernel, reference, compacted):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(comp, ref, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_gradcheck_float64(density):
    x, gate_up, down, mask = ffn(d=6, f=10, density=density, lead=(2, 3), seed=3)
    assert torch.autograd.gradcheck(lambda *a: masked_ffn(*a, mask, backend="kernel"), (x, gate_up, down))


@needs_kernel
def test_pruned_neurons_get_exactly_zero_gradient_and_are_never_used():
    x, gate_up, down, mask = ffn(density=0.5)
    out = masked_ffn(x, gate_up, down, mask, backend="kernel")
    g_gu, g_down = torch.autograd.grad(out.square().sum(), (gate_up, down))
    pruned = mask == 0
    assert pruned.any() and (~pruned).any()
    assert (g_gu[torch.cat([pruned, pruned])] == 0).all() and (g_down[:, pruned] == 0).all()
    assert (g_gu[torch.cat([~pruned, ~pruned])] != 0).any()
    with torch.no_grad():  # poisoning a pruned neuron's weights with NaN changes nothing: it is skipped
        gate_up[torch.cat([pruned, pruned])] = float("nan")
        down[:, pruned] = float("nan")
        assert torch.equal(masked_ffn(x, gate_up, down, mask, backend="kernel"), out)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_kept_is_exactly_the_dense_mlp(dtype):
    cfg = tiny_config()
    mlp = MLP(cfg).to(dtype)
    x = torch.randn(2, 9, cfg.d_model, dtype=dtype)
    with torch.no_grad():
        dense = mlp(x)
        out = masked_ffn(x, mlp.gate_up_proj.weight, mlp.down_proj.weight, torch.ones(cfg.d_ff), backend="kernel")
    assert torch.equal(out, dense)


@needs_kernel
def test_all_pruned_gives_zeros():
    x, gate_up, down, mask = ffn(density=0.0)
    assert mask.sum() == 0
    out = masked_ffn(x, gate_up, down, mask, backend="kernel")
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    g = torch.autograd.grad(out.sum(), (x, gate_up, down))
    assert all(torch.equal(t, torch.zeros_like(t)) for t in g)


@needs_kernel
def test_bfloat16_within_twice_the_reference_error():
    x, gate_up, down, mask = ffn(d=64, f=256, density=0.5, lead=(4, 32), dtype=torch.float32)
    x, gate_up, down = (t.detach() for t in (x, gate_up, down))
    exact = masked_ffn_reference(x.double(), gate_up.double(), down.double(), mask.double())
    low = [t.bfloat16() for t in (x, gate_up, down, mask)]
    ours = (masked_ffn(*low, backend="kernel").double() - exact).abs().max()
    theirs = (masked_ffn_reference(*low).double() - exact).abs().max()
    assert ours <= 2 * theirs + 1e-6, f"bf16 max error {ours:.3g}, reference's {theirs:.3g}"


@needs_kernel
def test_under_bf16_autocast_float32_weights_train_as_the_reference_trains_them():
    """A custom op is not autocast: masked_ffn casts its inputs as autocast casts a matmul's, and the
    float32 weights get float32 gradients within bf16's error of the reference's."""
    x, gate_up, down, mask = ffn(d=32, f=64, density=0.5, lead=(4, 8), dtype=torch.float32)
    grad_out = torch.randn(4, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda *a: masked_ffn(*a, backend="kernel"), x, gate_up, down, mask, grad_out)
        ref = grads(masked_ffn_reference, x, gate_up, down, mask, grad_out)
    exact = grads(masked_ffn_reference, x.double(), gate_up.double(), down.double(), mask.double(),
                  grad_out.double())
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for a, b, e in zip(ours, ref, exact):
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-3


def test_compact_ffn_matches_its_reference_and_keeps_order():
    _, gate_up, down, mask = ffn(f=8, density=0.5)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.float64)
    gu, dn = compact_ffn(gate_up, down, mask)
    kept = [0, 3, 4, 6]
    assert torch.equal(gu, gate_up[kept + [8 + k for k in kept]]) and torch.equal(dn, down[:, kept])
    ref = ffn_compact_reference(gate_up, down, mask)
    assert torch.equal(gu, ref[0]) and torch.equal(dn, ref[1])


@needs_kernel
def test_opcheck_schema_autograd_and_fake():
    x, gate_up, down, mask = ffn(d=8, f=12, density=0.5, lead=(2, 5), dtype=torch.float32)
    torch.library.opcheck(torch.ops.minilm.masked_ffn_fwd.default, (x, gate_up, down, mask),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, hidden = torch.ops.minilm.masked_ffn_fwd(x.detach(), gate_up.detach(), down.detach(), mask)
    assert hidden.shape == (10, 2 * int(mask.sum()))
    args = (torch.randn_like(out), x.detach(), gate_up.detach(), down.detach(), mask, hidden)
    torch.library.opcheck(torch.ops.minilm.masked_ffn_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("change, message", [
    (lambda x, gu, dn, m: (x, gu, dn, m[:-1]), "mask has 23 entries but the layer has 24 neurons"),
    (lambda x, gu, dn, m: (x, gu, dn, m * 0.5), "exactly 0 (pruned) or 1 (kept)"),
    (lambda x, gu, dn, m: (x[..., :-1], gu, dn, m), "shapes do not fit"),
    (lambda x, gu, dn, m: (x, gu[:-1], dn, m), "shapes do not fit"),
    (lambda x, gu, dn, m: (x, gu, dn, m.view(4, 6)), "mask (F,)"),
])
def test_bad_inputs_say_what_is_wrong(backend, change, message):
    if backend == "kernel" and not _kernels.LOADED:
        pytest.skip("minilm._C is not built")
    args = change(*ffn())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        masked_ffn(*args, backend=backend)


def test_mask_that_needs_a_gradient_is_refused():
    x, gate_up, down, mask = ffn()
    with pytest.raises(ValueError, match="no gradient for the mask"):
        masked_ffn(x, gate_up, down, mask.requires_grad_())


@needs_kernel
@pytest.mark.parametrize("change, message", [
    (lambda x, gu, dn, m: (x, gu, dn, m[:-1]), "mask has 23 entries but the FFN has F = 24"),
    (lambda x, gu, dn, m: (x, gu, dn, m * 2), "mask values must be exactly 0"),
    (lambda x, gu, dn, m: (x.float(), gu, dn, m), "must share one floating dtype"),
    (lambda x, gu, dn, m: (x, gu[:-2], dn, m), "shapes do not fit"),
])
def test_raw_op_checks(change, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.minilm.masked_ffn_fwd(*(t.detach() for t in change(*ffn())))


def test_model_routes_masks_and_straight_through_masks_get_gradients():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Phi3(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    masks = [(torch.rand(cfg.d_ff) < 0.5).double() for _ in range(cfg.n_layer)]
    set_neuron_masks(model, masks)
    assert get_neuron_masks(model) == masks
    skipped = model(idx)[0]  # masks that need no gradient: the kernel (or reference) skips neurons
    soft = [m.clone().requires_grad_() for m in masks]
    set_neuron_masks(model, soft)
    logits = model(idx)[0]  # act * mask, differentiable in the mask
    torch.testing.assert_close(skipped, logits, rtol=1e-10, atol=1e-10)
    mask_grads = torch.autograd.grad(logits.square().mean(), soft)
    assert all(g.abs().sum() > 0 for g in mask_grads)
    set_neuron_masks(model, [None] * cfg.n_layer)
    assert not torch.allclose(model(idx)[0], skipped)  # the masks did change the function
    with pytest.raises(ValueError, match="layer 0 needs a float mask of shape"):
        set_neuron_masks(model, [torch.ones(cfg.d_ff + 1)] * cfg.n_layer)
    with pytest.raises(ValueError, match="got 1 masks for 2 layers"):
        set_neuron_masks(model, [None])


def _backend_chosen(value: str) -> str:
    code = "import minilm.ops.masking as m; print(m.BACKEND)"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MINILM_OPS": value},
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_minilm_ops_reference_forces_the_reference():
    assert _backend_chosen("reference") == "reference"
    if _kernels.LOADED:
        assert _backend_chosen("cpu") == "kernel"


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_READY, reason="needs a CUDA GPU and minilm._C built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_equals_reference(dtype):
    x, gate_up, down, mask = ffn(d=256, f=1024, density=0.5, lead=(4, 128), dtype=dtype, device="cuda")
    grad_out = torch.randn_like(x)
    ours = grads(lambda *a: masked_ffn(*a, backend="kernel"), x, gate_up, down, mask, grad_out)
    exact = grads(masked_ffn_reference, *(t.detach().double().requires_grad_() for t in (x, gate_up, down)),
                  mask.double(), grad_out.double())
    theirs = grads(masked_ffn_reference, x, gate_up, down, mask, grad_out)
    for name, o, e, t in zip(("out", "grad_x", "grad_gate_up", "grad_down"), ours, exact, theirs):
        err, ref_err = (o.double() - e).abs().max(), (t.double() - e).abs().max()
        assert err <= 2 * ref_err + 1e-5, f"{name}: {err:.3g} vs reference's {ref_err:.3g}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles(tmp_path):
    """masking_cuda.cu is torch-free, so nvcc alone compiles it (no GPU needed)."""
    source = Path(__file__).resolve().parents[1] / "csrc/masking/masking_cuda.cu"
    cmd = ["nvcc", "-c", "-std=c++17", "-O2", "-gencode", "arch=compute_90,code=sm_90", str(source),
           "-o", str(tmp_path / "masking.o")]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
