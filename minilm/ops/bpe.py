r"""BPE training compiled: the pre-tokenizer (`torch.ops.minilm.bpe_count_chunks`, csrc/tokenizer/
pretokenize.cpp) and the merge loop (`torch.ops.minilm.bpe_train`, csrc/tokenizer/bpe_train.cpp).

    counts = compiled_chunk_counts(["hug hug"], max_digits=1)     # Counter({b"hug": 1, b" hug": 1})
    compiled_split("I'LL pay 42.", max_digits=1)   # ["I", "'LL", " pay", " ", "4", "2", "."]
    merges = compiled_merges({b"hug": 3, b"pug": 1}, n_merges=2)   # [(b"u", b"g"), (b"h", b"ug")]
    # both None when minilm._C was not built: use minilm.bpe_train's count_chunks and learn_merges

The pre-tokenizer is minilm.bpe_train.SPLIT_PATTERN (max_digits=1) or GPT4_SPLIT_PATTERN (3) matched by
hand, not by a regex engine; `unicode_classes` tells it which code points are \p{L}, \p{N} and \s, and
is computed from the `regex` module itself, so both splits agree whatever Unicode version `regex` has;
tests/test_pretokenize.py compares the two chunk for chunk.

The C++ merge loop is the Python reference's algorithm line for line (incremental pair counts, an inverted
index, a lazily invalidated max-heap, ties to the smaller pair, merges whose bytes already exist
skipped), so the merges are identical; tests/test_tokenizer.py checks it on random and real text.
Here the distinct chunks are packed into three tensors, and the merged id pairs are turned back
into the (left bytes, right bytes) list that `learn_merges` returns. Fewer than `n_merges` merges
come back when the text runs out of pairs; the caller says so.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import regex
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


# bits of the class table; bits 3-6 hold 1 + the index in CONTRACTIONS of the letter (?i:x) a code point
# matches, for the pattern's '(?i:[sdmt]|ll|ve|re)'
LETTER, NUMBER, SPACE = 1, 2, 4
CONTRACTIONS = "sdmtlvre"
N_CODE_POINTS = 0x110000


@functools.cache
def unicode_classes() -> torch.Tensor:
    """(0x110000,) uint8: each code point's class bits, as the `regex` module itself matches them.

    Asking `regex` (over a string of every code point, once per process, ~0.1 s) rather than Python's
    unicodedata or a table in C++ means the compiled split and the `regex` reference cannot disagree
    when one of them moves to a newer Unicode version. Surrogates stand in as U+0000 (class 0): valid
    UTF-8 never holds them."""
    codes = np.arange(N_CODE_POINTS, dtype=np.uint32)
    codes[0xD800:0xE000] = 0
    every = codes.tobytes().decode(f"utf-32-{sys.byteorder[0]}e")   # string index == code point
    table = np.zeros(N_CODE_POINTS, dtype=np.uint8)   # numpy: its ~900 slice updates took 0.25 s in torch
    for bit, run in ((LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+"), (SPACE, r"\s+")):
        for m in regex.finditer(run, every):
            table[m.start():m.end()] |= bit
    for k, letter in enumerate(CONTRACTIONS, 1):
        for m in regex.finditer(f"(?i:{letter})", every):   # s also matches S and U+017F (long s)
            table[m.start()] |= k << 3
    return torch.from_numpy(table)


def _batches(texts: Iterable[str], batch_bytes: int) -> Iterator[list[bytes]]:
    """The texts as UTF-8, in lists of about `batch_bytes` bytes: a long stream is split batch by batch."""
    batch, size = [], 0
    for text in texts:
        batch.append(text.encode("utf-8"))
        size += len(batch[-1])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def compiled_chunk_counts(texts: Iterable[str], max_digits: int,
                          batch_bytes: int = 1 << 26) -> Counter[bytes] | None:
    """What minilm.bpe_train.count_chunks counts with SPLIT_PATTERN (max_digits 1) or GPT4_SPLIT_PATTERN
    (3), in the same order (first occurrence), split in C++ on torch's threads; None if not built."""
    if not LOADED:
        return None
    classes, total = unicode_classes(), Counter()
    for batch in _batches(texts, batch_bytes):
        data = bytearray().join(batch)
        if not data:   # only empty texts: no chunks (and torch.frombuffer refuses an empty buffer)
            continue
        text = torch.frombuffer(data, dtype=torch.uint8)                                      # (bytes,)
        offsets = torch.tensor([0, *itertools.accumulate(map(len, batch))], dtype=torch.int64)  # (T + 1,)
        chunks, chunk_offsets, counts = torch.ops.minilm.bpe_count_chunks(text, offsets, classes, max_digits)
        raw, o = chunks.numpy().tobytes(), chunk_offsets.tolist()
        total.update(dict(zip((raw[a:b] for a, b in itertools.pairwise(o)), counts.tolist())))
    return total


def compiled_split(text: str, max_digits: int) -> list[str] | None:
    """The chunks of one text, as regex.findall(SPLIT_PATTERN or GPT4_SPLIT_PATTERN, text) gives them."""
    if not LOADED:
        return None
    data = text.encode("utf-8")
    if not data:
        return []
    bounds = torch.ops.minilm.bpe_split(torch.frombuffer(bytearray(data), dtype=torch.uint8), unicode_classes(),
                                        max_digits).tolist()   # (C + 1,) byte offsets
    return [data[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
