"""Byte-level BPE training, the readable reference: split, count chunks, merge pairs (lesson 02).

    from minilm.bpe_train import count_chunks, learn_merges, reference_encode
    merges = learn_merges(count_chunks(texts), n_merges=1787)   # [(b" ", b"t"), (b"h", b"e"), ...]
    ids = reference_encode("the cat", merges)                   # the textbook encoder, for tests

Text is first cut into chunks by SPLIT_PATTERN (words, single digits, punctuation runs,
whitespace) and merges never cross a chunk boundary. It is cl100k's GPT4_SPLIT_PATTERN except
that every digit is its own chunk, as in Phi-3-mini's Llama-2 tokenizer (arXiv 2404.14219):
"1234" is always 4 tokens, so a small model adds numbers digit by digit instead of memorising a
sum table for each of 1,000 three-digit tokens.

Training (`learn_merges`, after Sennrich et al. 2016, arXiv 1508.07909) is incremental: unique
chunks are counted once, pair counts and an inverted index (pair -> chunks) are updated only where
a merge changes them, and a max-heap with lazy invalidation finds the next pair. Ties go to the
highest count, then the smallest pair, so the same text always gives the same vocabulary. The
i-th merge creates id 256 + i. `minilm.tokenizer.Tokenizer.train` turns merges into a served
vocabulary; it runs the split (the pattern matched by hand in C++) and this same loop compiled
(minilm/ops/bpe.py) when the kernels are built, and the tests check both against these functions.
`reference_encode` is the slow textbook encoder that tiktoken's output is tested against.

Deviation: a merge whose bytes already exist as a token (possible in principle, never seen in our
runs) is skipped, so that ranks stay one-to-one.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import regex
from tqdm import tqdm

from minilm import MinilmError

# cl100k_base's pre-tokenizer: contractions | optional non-letter + letters | 1-3 digits |
# optional space + punctuation run | newlines | trailing whitespace | other whitespace.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                      r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# ours: the same, with one digit per chunk (\p{N}) where cl100k takes up to three
SPLIT_PATTERN = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}")
# the patterns the compiled pre-tokenizer knows, by the most digits a number chunk holds
_COMPILED_DIGITS = {SPLIT_PATTERN: 1, GPT4_SPLIT_PATTERN: 3}
class TokenizerError(MinilmError, ValueError):
    """A tokenizer could not be built, loaded or used; the message says what to do (a user's input
    error like any MinilmError, and a ValueError for callers that catch those)."""


def count_chunks(texts: Iterable[str], pattern: str = SPLIT_PATTERN, threads: int | None = None,
                 backend: str = "auto") -> Counter[bytes]:
    """Split every text with `pattern` and count each distinct chunk, as UTF-8 bytes.

    Batches of texts are split on `threads` threads (default: one per core): `regex` releases the
    GIL while it matches (concurrent=True), and the sum of the counts does not depend on the order.
    backend "auto" splits SPLIT_PATTERN and GPT4_SPLIT_PATTERN in C++ (minilm/ops/bpe.py, on torch's
    threads) when minilm._C is built; this function's `regex` path is the reference it is tested
    against, chunk for chunk, and it gives the same Counter in the same order. Both paths read `texts`
    in batches (a few at a time in flight), so a streamed corpus costs the memory of its distinct
    chunks, not of its text."""
    if backend not in ("auto", "python"):
        raise TokenizerError(f"backend must be 'auto' or 'python', not {backend!r}")
    if backend == "auto" and pattern in _COMPILED_DIGITS:
        from minilm.ops.bpe import compiled_chunk_counts   # imports torch: only when counting
        counts = compiled_chunk_counts(texts, _COMPILED_DIGITS[pattern])
        if counts is not None:
            return counts
    split = regex.compile(pattern)

    def count(batch: list[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for text in batch:
            counts.update(split.findall(text, concurrent=True))
        return counts

    texts, threads = iter(texts), threads or os.cpu_count() or 1
    batches = iter(lambda: list(itertools.islice(texts, 64)), [])
    total: Counter[str] = Counter()
    with ThreadPoolExecutor(threads) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append(pool.submit(count, batch))
            if len(in_flight) >= 2 * threads:
                total.update(in_flight.popleft().result())   # in submission order, as pool.map would
        for future in in_flight:
            total.update(future.result())
    return Counter({chunk.encode("utf-8"): n for chunk, n in total.items()})


def count_pairs(chunks: dict[bytes, int]) -> Counter[tuple[int, int]]:
    """How often each adjacent pair of byte ids occurs, each chunk weighted by its count.

    {b"hug": 3, b"pug": 1} gives (h, u): 3, (u, g): 4, (p, u): 1; b"aaa" once gives (a, a): 2.
    """
    counts: Counter[tuple[int, int]] = Counter()
    for chunk, freq in chunks.items():
        for pair in zip(chunk, chunk[1:]):  # bytes iterate as ints: the ids 0..255
            counts[pair] += freq
    return counts


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` with `new_id`, scanning left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2  # non-overlapping: "aaa" with (a, a) gives [aa, a], as tiktoken does
        else:
            out.append(ids[i])
            i += 1
    return out


def _pop_best(heap: list, counts: dict, skipped: set) -> tuple[int, int] | None:
    """Pop the most frequent pair, dropping heap entries whose count is out of date."""
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if -neg_count == counts.get(pair, 0) > 0 and pair not in skipped:
            return pair
    return None


def learn_merges(chunks: dict[bytes, int], n_merges: int,
                 progress: bool = False) -> list[tuple[bytes, bytes]]:
    """Learn `n_merges` BPE merges from chunk counts; returns (left bytes, right bytes) pairs.

    The i-th merge creates token id 256 + i with bytes left + right.
    """
    words, freqs = [list(chunk) for chunk in chunks], list(chunks.values())  # chunk = token ids
    vocab = [bytes([b]) for b in range(256)]   # id -> bytes, grows by one per merge
    counts: dict[tuple[int, int], int] = defaultdict(int, count_pairs(chunks))
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> the chunks containing it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in counts.items()]  # min-heap of -count = max-heap of count
    heapq.heapify(heap)
    known, skipped = set(vocab), set()
    merges: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=n_merges, desc="bpe merges", disable=not progress)
    while len(merges) < n_merges:
        pair = _pop_best(heap, counts, skipped)
        if pair is None:
            raise _ran_out(len(merges))
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        if new_bytes in known:  # same bytes reached by another split: keep ranks one-to-one
            skipped.add(pair)
            continue
        new_id = len(vocab)
        vocab.append(new_bytes)
        known.add(new_bytes)
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        _apply_merge(pair, new_id, words, freqs, counts, where, heap)
        bar.update(1)
    bar.close()
    return merges


def _ran_out(n_merges: int) -> TokenizerError:
    return TokenizerError(f"the training text ran out of pairs after {n_merges} merges; pass more text "
                          f"or a vocab_size of at most {256 + n_merges} + the number of special tokens")


def _apply_merge(pair, new_id, words, freqs, counts, where, heap) -> None:
    """Rewrite only the chunks that contain `pair`, updating pair counts, index and heap."""
    delta: dict[tuple[int, int], int] = defaultdict(int)
    for i in where.pop(pair):
        old, freq = words[i], freqs[i]
        words[i] = new = merge_pair(old, pair, new_id)
        old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
        for p in old_pairs:
            delta[p] -= freq
        for p in new_pairs:
            delta[p] += freq
            where[p].add(i)
        for p in set(old_pairs).difference(new_pairs):
            if p != pair:  # where[pair] is already gone
                where[p].discard(i)
    for p, d in delta.items():
        if d:
            counts[p] += d
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))


def reference_encode(text: str, merges: list[tuple[bytes, bytes]],
                     pattern: str = SPLIT_PATTERN) -> list[int]:
    """Slow textbook BPE: in each chunk, keep applying the earliest-learned merge present."""
    vocab = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    ids_of = {token: i for i, token in enumerate(vocab)}
    rank = {(ids_of[a], ids_of[b]): 256 + k for k, (a, b) in enumerate(merges)}
    out: list[int] = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            best = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if best not in rank:
                break
            ids = merge_pair(ids, best, rank[best])
        out.extend(ids)
    return out
