"""minilm's fused AdamW (csrc/optim/, minilm/ops/adamw.py) against torch.optim.AdamW, bit for bit.

    pytest -m lesson_03 tests/test_adamw.py -q

The kernel alone against torch's single-tensor step on hand-made tensors (odd sizes, both weight-decay
cases, gradients from 1e-6 to 10); the optimizer over 40 steps of a changing lr with two parameter
groups and a parameter that sometimes has no gradient; checkpoints crossing between the two classes in
both directions; the fallback for what the kernel does not cover; the op's input checks; every training loop
builds it.
Skipped when minilm._C is not built.
"""

import copy

import pytest
import torch
from conftest import tiny_config

from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.ops import _kernels, adamw
from minilm.ops.adamw import AdamW
from minilm.stages.pretrain import TrainConfig

pytestmark = [pytest.mark.lesson_03, pytest.mark.skipif(
    not _kernels.LOADED, reason=f"minilm._C is not built ({_kernels.LOAD_ERROR})")]

SIZES = [(128, 256), (7,), (33, 17), (2048, 64), (1,), (3 * 8192 + 5,)]  # odd sizes hit every tail


def random_grads(params, generator):
    for p in params:  # magnitudes 1e-6 .. 10, so every branch of the rounding is exercised
        scale = 10.0 ** torch.randint(-6, 2, (1,), generator=generator).item()
        p.grad = torch.randn(p.shape, generator=generator) * scale


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("step", [1, 2, 1000])
def test_the_kernel_is_torchs_single_tensor_step(weight_decay, step):
    g = torch.Generator().manual_seed(step)
    lr, beta1, beta2, eps = 3e-3, 0.9, 0.95, 1e-8
    for shape in SIZES:
        p, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        m, v = torch.randn(shape, generator=g) * 1e-2, torch.rand(shape, generator=g) * 1e-4
        # torch.optim.AdamW's arithmetic for one parameter, written out (torch/optim/adam.py, foreach=False)
        want_p, want_m, want_v = p.clone(), m.clone(), v.clone()
        want_p.mul_(1 - lr * weight_decay)
        want_m.lerp_(grad, 1 - beta1)
        want_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        want_p.addcdiv_(want_m, (want_v.sqrt() / bc2 ** 0.5).add_(eps), value=-(lr / bc1))

        torch.ops.minilm.adamw_step_(p, grad, m, v, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
                                     bc2 ** 0.5, eps, -(lr / bc1))
        for got, want in ((p, want_p), (m, want_m), (v, want_v)):
            assert torch.equal(got, want), (shape, (got != want).sum().item())


def train(cls, steps, seed=0, state=None):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SIZES]
    opt = cls([{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}],
              lr=3e-3, betas=(0.9, 0.95))
    if state is not None:
        params_state, opt_state = state
        with torch.no_grad():
            for p, saved in zip(params, params_state):
                p.copy_(saved)
        opt.load_state_dict(copy.deepcopy(opt_state))  # load_state_dict keeps the tensors it is given
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        random_grads(params, g)
        if t % 3 == 2:
            params[1].grad = None  # a parameter without a gradient this step is skipped, state and all
        for group in opt.param_groups:  # a schedule: the lr changes every step
            group["lr"] = 3e-3 * (t + 1) / steps
        opt.step()
    return params, opt


def assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key


def test_forty_steps_equal_torch_adamw_bit_for_bit():
    ours = train(AdamW, 40)
    assert ours[1]._fused_applies()  # the kernel ran, not torch's step
    assert_same(ours, train(torch.optim.AdamW, 40))


def test_checkpoints_cross_between_the_two_classes():
    for first, second in ((AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)):
        params, opt = train(first, 5)
        state = ([p.detach().clone() for p in params], opt.state_dict())
        assert_same(train(second, 7, seed=3, state=state), train(first, 7, seed=3, state=state))


def test_what_the_kernel_does_not_cover_takes_torchs_step():
    torch.manual_seed(0)
    p64 = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    p64.grad = torch.randn(10, dtype=torch.float64)
    opt = AdamW([p64], lr=1e-2)
    assert not opt._fused_applies()
    ref = p64.detach().clone().requires_grad_(True)
    ref.grad = p64.grad.clone()
    opt.step()
    torch.optim.AdamW([ref], lr=1e-2).step()
    assert torch.equal(p64, ref)
    strided = torch.nn.Parameter(torch.randn(8, 8).t())  # not contiguous
    strided.grad = torch.randn(8, 8).t()
    assert not AdamW([strided])._fused_applies()


def test_minilm_ops_torch_turns_it_off(monkeypatch):
    monkeypatch.setattr(adamw, "ENABLED", False)
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    assert not AdamW([p])._fused_applies()


def test_every_training_loop_builds_it():
    opt = make_optimizer(Phi3(tiny_config()), TrainConfig().optim)
    assert type(opt) is AdamW and opt.defaults["foreach"] is False


def test_the_op_names_what_is_wrong_with_its_inputs():
    p, g = torch.zeros(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensors"):
        torch.ops.minilm.adamw_step_(p.double(), g.double(), p.double(), p.double(), 1.0, 0.1, 0.95, 0.05, 1.0,
                                     1e-8, -1e-3)
    with pytest.raises(RuntimeError, match="must have param's size"):
        torch.ops.minilm.adamw_step_(p, torch.zeros(4), p.clone(), p.clone(), 1.0, 0.1, 0.95, 0.05, 1.0, 1e-8, -1e-3)
