"""Loads minilm's compiled kernels (`minilm._C`, built from csrc/ by setup.py) and teaches PyTorch
how to differentiate and trace them.

The C++ side only defines the ops and their device kernels:
    torch.ops.minilm.attention_fwd(q, k, v, causal, scale) -> (out, lse)
    torch.ops.minilm.attention_bwd(grad_out, q, k, v, out, lse, causal, scale) -> (grad_q, grad_k, grad_v)
Here, in Python (the pattern of PyTorch's custom-op tutorial):
  - `register_autograd` makes attention_fwd differentiable: the forward saves q, k, v, out and lse,
    the backward calls attention_bwd (FlashAttention-2 recomputes the scores from lse);
  - `register_fake` says what shapes and dtypes each op returns without computing anything, which
    is all torch.compile (and torch.library.opcheck) needs to trace through them.
`LOADED` says whether the kernels are there (`LOAD_ERROR` why not), `DEVICES` for which devices.
"""

from __future__ import annotations

import torch

try:
    import minilm._C  # registers torch.ops.minilm.*
    LOADED, LOAD_ERROR = True, None
    DEVICES = ("cpu", "cuda") if minilm._C.with_cuda else ("cpu",)  # the devices with our kernels
except ImportError as e:  # not built: no compiler at install time, or a pure-Python checkout
    LOADED, LOAD_ERROR, DEVICES = False, str(e), ()


if LOADED:
    @torch.library.register_fake("minilm::attention_fwd")
    def _attention_fwd_fake(q, k, v, causal, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("minilm::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)  # lse is the backward's helper, not an output to train through

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.ops.minilm.attention_bwd(
            grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return grad_q, grad_k, grad_v, None, None

    torch.library.register_autograd("minilm::attention_fwd", _backward, setup_context=_setup_context)
