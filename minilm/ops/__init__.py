"""The Python face of minilm's ops: each op picks its fastest available backend once at import.

    from minilm import ops
    out = ops.attention(q, k, v, causal=True)

Pure-PyTorch references for every op live in `minilm/ops/reference.py`.
"""

from minilm.ops.attention import attention, available_backends

__all__ = ["attention", "available_backends"]
