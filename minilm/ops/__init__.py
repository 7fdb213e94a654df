"""The Python face of minilm's ops: each op picks its fastest available backend once at import.

    from minilm import ops
    out = ops.attention(q, k, v, causal=True)
    y = ops.masked_ffn(x, gate_up_weight, down_weight, mask)   # FFN over kept neurons only
    loss = ops.cross_entropy(logits, targets)                 # (N, V), (N,): one read of the logits
    optimizer = ops.AdamW(model.parameters(), lr=3e-3)        # torch.optim.AdamW, fused on the CPU

Pure-PyTorch references for every op live in `minilm/ops/reference.py`.
"""

from minilm.ops.adamw import AdamW
from minilm.ops.attention import PaddingMask, attention, available_backends, combined_mask
from minilm.ops.loss import cross_entropy
from minilm.ops.masking import compact_ffn, masked_ffn

__all__ = ["AdamW", "PaddingMask", "attention", "available_backends", "combined_mask", "compact_ffn", "cross_entropy", "masked_ffn"]
