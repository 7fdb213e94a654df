"""BPE training's merge loop, compiled: `torch.ops.minilm.bpe_train` (csrc/tokenizer/bpe_train.cpp).

    merges = compiled_merges({b"hug": 3, b"pug": 1}, n_merges=2)   # [(b"u", b"g"), (b"h", b"ug")]
    # None when minilm._C was not built: use minilm.tokenizer.learn_merges, the reference

The C++ loop is the Python reference's algorithm line for line (incremental pair counts, an inverted
index, a lazily invalidated max-heap, ties to the smaller pair, merges whose bytes already exist
skipped), so the merges are identical; tests/test_tokenizer.py checks it on random and real text.
Here the distinct chunks are packed into three tensors, and the merged id pairs are turned back
into the (left bytes, right bytes) list that `learn_merges` returns. Fewer than `n_merges` merges
come back when the text runs out of pairs; the caller says so.
"""

from __future__ import annotations

import itertools

import torch

from minilm.ops._kernels import LOADED


def compiled_merges(chunks: dict[bytes, int], n_merges: int) -> list[tuple[bytes, bytes]] | None:
    """The merges `learn_merges(chunks, n_merges)` would learn, from the C++ trainer; None if not built."""
    if not LOADED:
        return None
    keys = list(chunks)
    data = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8) if keys else torch.empty(0, dtype=torch.uint8)
    offsets = torch.tensor([0, *itertools.accumulate(map(len, keys))], dtype=torch.int64)   # (N + 1,)
    freqs = torch.tensor([chunks[k] for k in keys], dtype=torch.int64)                     # (N,)
    pairs = torch.ops.minilm.bpe_train(data, offsets, freqs, n_merges).tolist()           # (M, 2) ids
    vocab = [bytes([b]) for b in range(256)]    # id -> bytes; merge k makes id 256 + k
    merges = []
    for left, right in pairs:
        merges.append((vocab[left], vocab[right]))
        vocab.append(vocab[left] + vocab[right])
    return merges
