"""`minilm.ops.AdamW`: torch.optim.AdamW whose CPU update is one fused pass per parameter.

    from minilm.ops import AdamW
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)   # as torch.optim.AdamW

Every training loop in minilm makes its optimizer through `make_optimizer` (minilm/loop.py), which
builds this class. On the CPU, torch.optim.AdamW (foreach=False, the default there) updates each
parameter with eight whole-tensor ops (csrc/optim/adamw_cpu.cpp lists them), so a small model's
step spends about a tenth of its time streaming the weights and both moments through memory, over
and over. `csrc/optim/` does the same arithmetic block by block, in one pass.

It is the same optimizer, not an approximation: weights, moments and step counts equal
torch.optim.AdamW's bit for bit after any number of steps (tests/test_adamw.py), its state_dict is
torch's, and a checkpoint written by either loads into the other. That is why it can be on by
default without changing one number the course quotes. PyTorch's own `fused=True` CPU kernel is
faster still but rounds differently (its results drift from the unfused ones in the last bits).
Anything the kernel does not cover (a GPU, float64 or DTensor parameters, amsgrad, maximize, the
kernels not built) takes torch.optim.AdamW's own step; `MINILM_OPS=torch` or `reference` forces it.
"""

from __future__ import annotations

import os

import torch

from minilm.ops import _kernels

ENABLED = (_kernels.LOADED and "cpu" in _kernels.DEVICES
           and os.environ.get("MINILM_OPS", "").strip().lower() not in ("reference", "torch"))


def _fusable(p: torch.Tensor) -> bool:
    """Whether the kernel can update p: a plain contiguous float32 CPU tensor with such a gradient."""
    g = p.grad
    return (type(p.data) is torch.Tensor and type(g) is torch.Tensor and p.device.type == "cpu"
            and p.dtype == torch.float32 and g.dtype == torch.float32 and not g.is_sparse
            and p.is_contiguous() and g.is_contiguous())


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay) with its step fused on the CPU; same arguments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        # foreach=False: where the fused step does not apply, torch runs the per-tensor loop we reproduce
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)

    def _fused_applies(self) -> bool:
        if not ENABLED or torch.get_default_dtype() != torch.float32:  # float32 state["step"], as below
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return False
            if any(isinstance(x, torch.Tensor) for x in (group["lr"], *group["betas"])):
                return False
            if not all(_fusable(p) for p in group["params"] if p.grad is not None):
                return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._fused_applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # exactly the state torch.optim.AdamW creates, so checkpoints load either way
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1  # a float32 tensor, read back as torch reads it
                step = state["step"].item()
                # the step's scalars in Python floats, the expressions torch.optim.AdamW evaluates
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
                torch.ops.minilm.adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], decay, 1 - beta1,
                                             beta2, 1 - beta2, bias_correction2 ** 0.5, eps, -(lr / bias_correction1))
        return loss
