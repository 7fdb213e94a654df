"""Loads minilm's compiled kernels (`minilm._C`, built from csrc/ by setup.py) and teaches PyTorch
how to differentiate and trace them.

The C++ side only defines the ops and their device kernels:
    torch.ops.minilm.attention_fwd(q, k, v, causal, scale) -> (out, lse)
    torch.ops.minilm.attention_bwd(grad_out, q, k, v, out, lse, causal, scale) -> (grad_q, grad_k, grad_v)
    torch.ops.minilm.attention_decode(q, k, v, key_start, scale) -> out   (KV-cache steps, no gradient)
    torch.ops.minilm.masked_ffn_fwd(x, gate_up_weight, down_weight, mask) -> (out, hidden)
    torch.ops.minilm.masked_ffn_bwd(grad_out, x, gate_up_weight, down_weight, mask, hidden) -> 3 grads
    torch.ops.minilm.ffn_compact(gate_up_weight, down_weight, mask) -> (gate_up_kept, down_kept)
    torch.ops.minilm.cross_entropy_fwd(logits, targets, ignore_index) -> (loss_rows, lse)
    torch.ops.minilm.cross_entropy_bwd(grad_rows, logits, targets, lse, ignore_index) -> grad_logits
Here, in Python (the pattern of PyTorch's custom-op tutorial):
  - `register_autograd` makes attention_fwd differentiable: the forward saves q, k, v, out and lse,
    the backward calls attention_bwd (FlashAttention-2 recomputes the scores from lse); likewise
    masked_ffn_fwd saves its hidden (N, 2K) for masked_ffn_bwd, and cross_entropy_fwd its lse (N,)
    for cross_entropy_bwd (ffn_compact is a composite of ATen
    ops, which autograd differentiates without help);
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
        # out (B, H, T, D) like q; lse (B, H, T), float32 whatever q's dtype
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("minilm::attention_decode")
    def _attention_decode_fake(q, k, v, key_start, scale):
        return torch.empty_like(q)

    @torch.library.register_fake("minilm::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)  # no (T, S) probabilities: the backward recomputes them
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)  # lse is the backward's helper, not an output to train through

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        # the kernels require contiguous inputs of one dtype; autograd may hand over a strided gradient
        # (e.g. via a transpose), or a bf16 one when a later op ran under autocast
        grad_q, grad_k, grad_v = torch.ops.minilm.attention_bwd(
            grad_out.to(q.dtype).contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return grad_q, grad_k, grad_v, None, None  # causal and scale get no gradient

    torch.library.register_autograd("minilm::attention_fwd", _backward, setup_context=_setup_context)

    # masked FFN (csrc/masking/): out, hidden = masked_ffn_fwd(x, gate_up, down, mask)
    @torch.library.register_fake("minilm::masked_ffn_fwd")
    def _masked_ffn_fwd_fake(x, gate_up_weight, down_weight, mask):
        kept = torch.library.get_ctx().new_dynamic_size()  # K depends on the mask's values
        # out like x (..., D); hidden (N, 2K): the kept neurons' gate and up values of the N = prod(...) tokens
        return torch.empty_like(x), x.new_empty((x.numel() // x.shape[-1], 2 * kept))

    @torch.library.register_fake("minilm::masked_ffn_bwd")
    def _masked_ffn_bwd_fake(grad_out, x, gate_up_weight, down_weight, mask, hidden):
        return torch.empty_like(x), torch.empty_like(gate_up_weight), torch.empty_like(down_weight)

    def _ffn_setup_context(ctx, inputs, output):
        x, gate_up_weight, down_weight, mask = inputs
        ctx.save_for_backward(x, gate_up_weight, down_weight, mask, output[1])
        ctx.mark_non_differentiable(output[1])  # hidden is the backward's helper

    def _ffn_backward(ctx, grad_out, _grad_hidden):
        x, gate_up_weight, down_weight, mask, hidden = ctx.saved_tensors
        # under autocast the op after this one may hand back a bf16 gradient for our float32 output
        grads = torch.ops.minilm.masked_ffn_bwd(grad_out.to(x.dtype).contiguous(), x, gate_up_weight, down_weight,
                                                mask, hidden)
        return (*grads, None)  # no gradient for the mask: use act * mask for that (model.MLP does)

    torch.library.register_autograd("minilm::masked_ffn_fwd", _ffn_backward, setup_context=_ffn_setup_context)

    # fused cross-entropy (csrc/loss/): loss_rows, lse = cross_entropy_fwd(logits, targets, ignore_index)
    @torch.library.register_fake("minilm::cross_entropy_fwd")
    def _cross_entropy_fwd_fake(logits, targets, ignore_index):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty(logits.shape[:1], dtype=acc), logits.new_empty(logits.shape[:1], dtype=acc)

    @torch.library.register_fake("minilm::cross_entropy_bwd")
    def _cross_entropy_bwd_fake(grad_loss, logits, targets, lse, ignore_index):
        return torch.empty_like(logits)

    def _ce_setup_context(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])  # the logits and lse (N,): no softmax kept
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(output[1])

    def _ce_backward(ctx, grad_rows, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.ops.minilm.cross_entropy_bwd(grad_rows.to(lse.dtype).contiguous(), logits, targets, lse,
                                                  ctx.ignore_index)
        return grad, None, None  # targets and ignore_index get no gradient

    torch.library.register_autograd("minilm::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup_context)
