"""Deduplication: drop exact copies, then near-copies found with MinHash + LSH (lesson 05).

    from data_prep.dedup import DedupConfig, deduplicate
    result = deduplicate(docs, DedupConfig(threshold=0.8))
    result.kept, result.dropped, result.counts      # counts == {"exact": n, "near": n}

Web-scale corpora repeat themselves; training on repeats wastes compute and encourages
memorisation. Dedup is a standard early step of web-data pipelines like the one behind Phi-3's
data (its report does not detail its dedup); this is a laptop-scale version, in two passes:

1. Exact. `normalize` lowercases, deletes every character that is neither a word character nor
   whitespace, and collapses whitespace; the blake2b digest of that is the key, and the first
   document (in input order) with each key is kept.
2. Near. Each document becomes the set of its word 5-gram shingles; two documents are
   near-duplicates when the Jaccard similarity of their sets is >= `threshold` (Broder 1997;
   Leskovec et al., Mining of Massive Datasets, ch. 3). MinHash signatures of `num_perm` universal
   hashes (a x + b) mod (2^31 - 1) estimate it; LSH with `bands` x `rows` finds candidate pairs with
   probability `lsh_probability(s) = 1 - (1 - s**rows)**bands`. Candidates are verified, joined
   with union-find, and each cluster keeps its first document; the others are dropped with
   `meta["duplicate_of"]` naming the kept one.

Streaming (data_prep/pipeline.py): `ExactDedup` sees one document at a time and keeps a 16-byte
key and an id per distinct text; `cluster` needs only the signatures, which a `SignatureFile` keeps
on disk and hands over a band at a time, so the documents never have to be in memory together.
Simplifications vs. production dedup (e.g. datatrove's MinHash stage): one process clusters the
whole corpus; clustering is transitive, so a chain A~B~C drops C even if J(A, C) is below the
threshold.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import combinations
from pathlib import Path

import numpy as np

from data_prep.document import Document
from data_prep.parallel import parallel_map

MERSENNE_PRIME = (1 << 31) - 1
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


@dataclass
class DedupConfig:
    ngram: int = 5            # words per shingle
    num_perm: int = 128       # MinHash signature length
    bands: int | None = None  # LSH bands; None: chosen by choose_bands(num_perm, threshold)
    rows: int | None = None   # LSH rows per band; set both or neither
    threshold: float = 0.8    # estimated Jaccard at or above which two documents are duplicates
    seed: int = 0             # seeds the hash functions (a_i, b_i)


@dataclass
class DedupResult:
    kept: list[Document]
    dropped: list[Document]   # each with meta["duplicate_of"] and meta["dedup"] ("exact"/"near")
    counts: dict = field(default_factory=dict)


def normalize(text: str) -> str:
    """Lowercase, delete non-word non-space characters, collapse whitespace, strip."""
    text = _NOT_WORD_OR_SPACE.sub("", text.lower())
    return _SPACES.sub(" ", text).strip()


def exact_key(text: str) -> bytes:
    """The exact-dedup key: the 16-byte blake2b digest of the normalised text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word n-grams of the normalised text (one shingle if it has fewer than n words)."""
    words = normalize(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def hash_shingles(shingle_set: set[str]) -> np.ndarray:
    """64-bit blake2b of each shingle, reduced mod p; shape (n_shingles,), uint64 values < 2^31."""
    values = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
              % MERSENNE_PRIME for s in shingle_set]
    return np.array(values, dtype=np.uint64)


def hash_params(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The universal-hash coefficients a (in [1, p)) and b (in [0, p)), each shape (num_perm,)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
    return a, b


def minhash(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature, shape (num_perm,): min over shingles of (a_i x + b_i) mod p.

    a x < 2^31 * 2^31 = 2^62 and + b < 2^63, so uint64 never overflows. An empty set gets the
    all-p signature (larger than any real hash value).
    """
    if hashes.size == 0:
        return np.full(a.shape, MERSENNE_PRIME, dtype=np.uint64)
    table = (a[:, None] * hashes[None, :] + b[:, None]) % MERSENNE_PRIME  # (num_perm, n_shingles)
    return table.min(axis=1)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of signature positions where the two minima agree."""
    return float(np.mean(sig_a == sig_b))


def jaccard(a: set, b: set) -> float:
    """The true Jaccard similarity |a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def lsh_probability(s, bands: int, rows: int):
    """P[two documents with Jaccard s share at least one band bucket] = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def choose_bands(num_perm: int, threshold: float, fn_weight: float = 4.0) -> tuple[int, int]:
    """Pick (bands, rows) with bands * rows == num_perm for a similarity threshold t.

    The S-curve's steepest point sits near s* = (1/b)^(1/r); the rule of thumb puts s* at t.
    We instead minimise what the curve gets wrong, as areas under it:
        false-positive area = integral_0^t  P(s) ds       (dissimilar pairs that become candidates)
        false-negative area = integral_t^1  1 - P(s) ds   (similar pairs that never meet)
    and weight false negatives `fn_weight` times more: a false positive costs one signature
    comparison (verification throws it out), a false negative is a duplicate left in the data.
    Only divisors of num_perm are tried. For num_perm=128, t=0.8 this picks bands=16, rows=8
    (s* ~ 0.71; P = 0.06, 0.61, 0.95, 0.9999 at s = 0.5, 0.7, 0.8, 0.9). With equal weights it
    would pick bands=8, rows=16 (s* ~ 0.88), which finds only 20% of pairs at s = 0.8.
    """
    s = np.linspace(0.0, 1.0, 2001)
    best, best_err = None, float("inf")
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        p = lsh_probability(s, bands, rows)
        err = np.trapezoid(np.where(s < threshold, p, fn_weight * (1.0 - p)), s)
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is always its smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


class SignatureFile:
    """MinHash signatures on disk, (n_docs, num_perm) uint32, appended a batch at a time.

    It answers the two reads `cluster` makes of a signature matrix: `sigs[:, lo:hi]` (one band's
    columns for every document, read chunk by chunk) and `sigs[i]` (one document's signature, to
    verify a candidate pair). So clustering holds a band (rows x 4 bytes per document), not every
    signature (num_perm x 4)."""

    def __init__(self, path, num_perm: int, chunk_docs: int = 4096):   # 2 MB read at a time
        self.path, self.num_perm, self.chunk_docs, self.n_docs = Path(path), num_perm, chunk_docs, 0
        self.file = open(self.path, "w+b")

    def append(self, sigs: np.ndarray) -> None:
        self.file.write(np.asarray(sigs, dtype=np.uint32).tobytes())   # values < 2^31 fit in 4 bytes
        self.n_docs += len(sigs)

    def __len__(self) -> int:
        return self.n_docs

    def __getitem__(self, key) -> np.ndarray:
        self.file.flush()
        row_bytes = 4 * self.num_perm
        if isinstance(key, (int, np.integer)):
            return np.frombuffer(os.pread(self.file.fileno(), row_bytes, row_bytes * int(key)), dtype=np.uint32)
        rows, cols = key
        if rows != slice(None):
            raise TypeError("a SignatureFile reads one row, or some columns of every row: sigs[i], sigs[:, lo:hi]")
        parts = [np.zeros((0, self.num_perm), np.uint32)[:, cols]]
        for lo in range(0, self.n_docs, self.chunk_docs):   # chunk_docs rows at a time, only `cols` kept
            count = min(self.chunk_docs, self.n_docs - lo) * self.num_perm
            chunk = np.fromfile(self.path, dtype=np.uint32, count=count, offset=lo * row_bytes)
            parts.append(chunk.reshape(-1, self.num_perm)[:, cols].copy())
        return np.concatenate(parts)

    def close(self) -> None:
        self.file.close()


def band_buckets(signatures: np.ndarray, band: int, rows: int) -> list[np.ndarray]:
    """The buckets of one band that hold 2+ documents, each an ascending array of indices.

    signatures: (n_docs, bands * rows). A band's rows, as bytes, are its bucket key; sorting the
    keys puts each bucket's members side by side, at 8 bytes of index per document (a dict of
    buckets would cost ~200 bytes per document).
    """
    block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
    keys = block.view(f"V{block.itemsize * rows}").ravel()              # (n_docs,) opaque keys
    order = np.argsort(keys, kind="stable")                             # members stay in index order
    keys = keys[order]
    edges = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])    # where each bucket starts/ends
    return [order[edges[k]:edges[k + 1]] for k in np.flatnonzero(np.diff(edges) > 1)]


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose signatures agree on every row of at least one band."""
    return {pair for band in range(bands) for members in band_buckets(signatures, band, rows)
            for pair in combinations(members.tolist(), 2)}


def cluster(signatures: np.ndarray, bands: int, rows: int, threshold: float) -> np.ndarray:
    """Each document's cluster root, shape (n_docs,): candidates from shared band buckets, verified
    (estimated Jaccard >= threshold) and joined with union-find. roots[i] == i marks the first
    document of its cluster, the one to keep. `signatures`: an array or a `SignatureFile`.

    The clusters are the connected components of the verified `candidate_pairs`; joining them band
    by band gives the same components without holding the set of pairs (which grows with the
    square of a bucket's size), and a pair already in one cluster needs no verifying."""
    uf = UnionFind(len(signatures))
    for band in range(bands):
        for members in band_buckets(signatures, band, rows):
            for i, j in combinations(members.tolist(), 2):
                if uf.find(i) != uf.find(j) and estimate_jaccard(signatures[i], signatures[j]) >= threshold:
                    uf.union(i, j)
    return np.array([uf.find(i) for i in range(len(signatures))], dtype=np.int64)


def mark_duplicate(doc: Document, kept_id: str, kind: str) -> Document:
    """A copy of `doc` whose meta names the document it duplicates and how ("exact" or "near")."""
    return replace(doc, meta={**doc.meta, "duplicate_of": kept_id, "dedup": kind})


class ExactDedup:
    """Exact dedup one document at a time: the 16-byte blake2b key of each distinct normalised
    text seen so far, and the id of its first document."""

    def __init__(self):
        self.first: dict[bytes, str] = {}

    def copy_of(self, doc: Document) -> str | None:
        """The id of an earlier document with the same normalised text, or None (then remembered)."""
        key = exact_key(doc.text)
        if key in self.first:
            return self.first[key]
        self.first[key] = doc.id
        return None


def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Keep the first document of each normalised-text hash; the rest are dropped."""
    seen, kept, dropped = ExactDedup(), [], []
    for doc in docs:
        first = seen.copy_of(doc)
        if first is None:
            kept.append(doc)
        else:
            dropped.append(mark_duplicate(doc, first, "exact"))
    return kept, dropped


def signature(text: str, ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One document's MinHash signature, (num_perm,) uint64, over its word `ngram`-shingles."""
    return minhash(hash_shingles(shingles(text, ngram)), a, b)


def lsh_shape(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows) from the config: as given, or chosen by `choose_bands` when both are None."""
    bands, rows = cfg.bands, cfg.rows
    if bands is None and rows is None:
        bands, rows = choose_bands(cfg.num_perm, cfg.threshold)
    if bands is None or rows is None or bands * rows != cfg.num_perm:
        raise ValueError(f"bands * rows = {bands} * {rows} != num_perm = {cfg.num_perm}")
    return bands, rows


def near_dedup(docs: list[Document], cfg: DedupConfig, workers: int = 1,
               progress: bool = False) -> tuple[list[Document], list[Document]]:
    """MinHash + LSH + verification + union-find; keep the first document of each cluster."""
    bands, rows = lsh_shape(cfg)
    a, b = hash_params(cfg.num_perm, cfg.seed)
    # 1. signatures, (n_docs, num_perm): independent per document, so computed by `workers` processes
    sigs = parallel_map(partial(signature, ngram=cfg.ngram, a=a, b=b), [d.text for d in docs],
                        workers, desc="minhash", progress=progress)
    sigs = np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), dtype=np.uint64)
    # 2. candidates from shared band buckets, 3. verify, 4. cluster
    roots = cluster(sigs, bands, rows, cfg.threshold)
    # 5. each cluster's root is its first document (smallest index)
    kept, dropped = [], []
    for i, doc in enumerate(docs):
        if roots[i] == i:
            kept.append(doc)
        else:
            dropped.append(mark_duplicate(doc, docs[roots[i]].id, "near"))
    return kept, dropped


def deduplicate(docs, cfg: DedupConfig | None = None, workers: int = 1,
                progress: bool = False) -> DedupResult:
    """Exact pass, then near-duplicate pass on the survivors. Input order is preserved in `kept`."""
    cfg = cfg or DedupConfig()
    kept, exact_dropped = exact_dedup(list(docs))
    kept, near_dropped = near_dedup(kept, cfg, workers, progress)
    return DedupResult(kept=kept, dropped=exact_dropped + near_dropped,
                       counts={"exact": len(exact_dropped), "near": len(near_dropped)})
