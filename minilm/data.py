"""Token data: a corpus tokenized into binary shards, memory-mapped, sampled in random windows.

    build_shards(docs, tokenizer, "runs/data/mine", "train")   # (id, text) pairs -> shards
    writer = ShardWriter(tokenizer, "runs/data/mine", "train"); writer.add(text); writer.close()
    train = TokenDataset("runs/data/stdlib-2048", "train")
    x, y = train.batch(batch_size=16, seq_len=256, seed=0, step=7, micro=0)   # (16, 256) each

A shard is a 256-byte header (int64: magic, version, bytes per token, token count) followed by the
tokens as uint16 (vocab < 65536) or uint32. Documents are joined with `<|endoftext|>`.
The validation split is chosen per document by a hash of its id, so it never changes when the
corpus grows and no validation text leaks into training windows.

Windows are a pure function of (seed, step, micro-batch index): a resumed run sees exactly the
batches the uninterrupted run would have seen, and under DDP rank r of W takes micro-batch
indices r, r + W, ... so the ranks together see what one process with W x the accumulation sees.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minilm import MinilmError

MAGIC, VERSION, HEADER_INTS = 0x6D696E696C6D, 1, 32  # "minilm"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_header(itemsize: int, n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype=np.int64)      # 256 bytes; unused slots stay 0
    header[:4] = [MAGIC, VERSION, itemsize, n_tokens]
    return header.tobytes()


def write_shard(path, tokens: np.ndarray) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(shard_header(tokens.itemsize, len(tokens)))
        f.write(tokens.tobytes())
    tmp.rename(path)


def read_shard(path) -> np.ndarray:
    """Memory-map a shard's tokens, checking the header against the file's size."""
    path = Path(path)
    header = np.fromfile(path, dtype=np.int64, count=HEADER_INTS)
    if len(header) < 4 or header[0] != MAGIC:
        raise MinilmError(f"{path} is not a minilm token shard (bad magic); re-run `minilm prepare`")
    if header[1] != VERSION:
        raise MinilmError(f"{path} is shard format v{header[1]}, this minilm reads v{VERSION}; re-run `minilm prepare`")
    itemsize, count = int(header[2]), int(header[3])
    expected = HEADER_INTS * 8 + itemsize * count
    if path.stat().st_size != expected:
        raise MinilmError(f"{path} is truncated: {path.stat().st_size} bytes, header promises {expected}")
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 8, shape=(count,))


def is_validation(doc_id: str, val_fraction: float) -> bool:
    # a hash of the id, not a random draw: a document keeps its split however the corpus changes
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:4], "little") < val_fraction * 2**32


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best context-free model."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class ShardWriter:
    """Tokenize documents as they arrive (each followed by <|endoftext|>) into `{split}_NNN.bin` shards.

    Memory stays at one batch of `BATCH` texts: their tokens go straight into the open shard's
    temporary file, whose header (it holds the token count) is written when the shard closes. A
    shard closes after the batch that brings it to `shard_tokens` or more."""

    BATCH = 64   # texts per tokenizer call; shard boundaries fall between batches

    def __init__(self, tokenizer, out_dir, split: str, shard_tokens: int = 2**24):
        self.tokenizer, self.out_dir, self.split, self.shard_tokens = tokenizer, Path(out_dir), split, shard_tokens
        self.dtype = token_dtype(tokenizer.n_vocab)
        self.counts = np.zeros(tokenizer.n_vocab, dtype=np.int64)   # for the unigram entropy
        self.pending: list[str] = []
        self.file, self.in_shard = None, 0                          # the open shard and its tokens
        self.n_shards = self.n_tokens = self.n_bytes = self.n_documents = 0

    def add(self, text: str) -> None:
        self.pending.append(text)
        self.n_documents += 1
        if len(self.pending) == self.BATCH:
            self._encode_pending()

    def close(self) -> dict:
        """Write what is pending, close the last shard; the split's totals, as meta.json records them."""
        if self.pending:
            self._encode_pending()
        self._close_shard()
        return {"tokens": self.n_tokens, "bytes": self.n_bytes, "documents": self.n_documents,
                "shards": self.n_shards, "unigram_entropy": unigram_entropy(self.counts)}

    def _path(self) -> Path:
        return self.out_dir / f"{self.split}_{self.n_shards:03d}.bin"

    def _encode_pending(self) -> None:
        if self.file is None:
            self.file = open(self._path().with_suffix(".bin.tmp"), "wb")
            self.file.write(shard_header(np.dtype(self.dtype).itemsize, 0))   # rewritten on close
        for ids in self.tokenizer.encode_batch(self.pending):
            arr = np.asarray(ids + [self.tokenizer.eot_id], dtype=np.int64)
            np.add.at(self.counts, arr, 1)              # unbuffered: repeated ids all count
            self.file.write(arr.astype(self.dtype).tobytes())
            self.in_shard += len(arr)
            self.n_tokens += len(arr)
        self.n_bytes += sum(len(t.encode("utf-8")) for t in self.pending)
        self.pending = []
        if self.in_shard >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.file is None:
            return
        self.file.seek(0)
        self.file.write(shard_header(np.dtype(self.dtype).itemsize, self.in_shard))
        self.file.close()
        Path(self.file.name).rename(self._path())      # atomic: a shard is whole or absent
        self.file, self.in_shard, self.n_shards = None, 0, self.n_shards + 1


def build_shards(documents: Iterable[tuple[str, str]], tokenizer, out_dir, split: str,
                 shard_tokens: int = 2**24) -> dict:
    """Tokenize (id, text) pairs, each followed by <|endoftext|>, into `{split}_NNN.bin` shards."""
    writer = ShardWriter(tokenizer, out_dir, split, shard_tokens)
    for _, text in tqdm(documents, desc=f"tokenize {split}", unit="doc"):
        writer.add(text)
    return writer.close()


class TokenDataset:
    """All shards of one split, memory-mapped, with deterministic window sampling."""

    def __init__(self, directory, split: str):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            raise MinilmError(f"{self.directory} holds no prepared data (no meta.json); "
                              f"run `minilm prepare --data-dir {self.directory}`")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.info = self.meta["splits"][split]
            self.info["shards"], self.info["tokens"], self.info["bytes"]
        except (ValueError, KeyError, TypeError) as e:
            raise MinilmError(f"{meta_path} is corrupt ({e!r}); prepare the data again (`minilm data` or "
                              f"`minilm prepare`) into a fresh folder") from e
        paths = sorted(self.directory.glob(f"{split}_*.bin"))
        if len(paths) != self.info["shards"]:
            raise MinilmError(f"{self.directory}: meta.json lists {self.info['shards']} {split} shards, "
                              f"found {len(paths)}; re-run `minilm prepare`")
        self.shards = [read_shard(p) for p in paths]
        self.n_tokens = sum(len(s) for s in self.shards)

    def check_tokenizer(self, tokenizer) -> None:
        """The shards must be the ids of `tokenizer` (meta.json records the one that wrote them)."""
        recorded = self.meta.get("tokenizer", {}).get("fingerprint")
        if recorded is not None and recorded != tokenizer.fingerprint():
            raise MinilmError(f"{self.directory}: its shards were written by tokenizer {recorded}, but its "
                              f"tokenizer files are {tokenizer.fingerprint()}; prepare the data again")

    @property
    def bytes_per_token(self) -> float:
        return self.info["bytes"] / self.info["tokens"]

    def _windows(self, starts: list[tuple[int, int]], seq_len: int):
        rows = [torch.from_numpy(self.shards[s][o:o + seq_len + 1].astype(np.int64)) for s, o in starts]
        data = torch.stack(rows)  # (B, T + 1): inputs and next-token targets overlap by T
        return data[:, :-1], data[:, 1:]

    def batch(self, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0):
        """Random windows (x, y), each (batch_size, seq_len), fixed by (seed, step, micro)."""
        room = np.array([max(len(s) - seq_len - 1, 0) for s in self.shards], dtype=np.float64)
        if room.sum() == 0:
            raise MinilmError(f"{self.directory}: every shard is shorter than seq_len + 1 = {seq_len + 1} "
                              f"tokens; use a shorter --seq-len or more data")
        rng = np.random.default_rng([seed, step, micro])   # no state to save: resume is exact
        # a shard is picked in proportion to its room, so every start position is equally likely
        shard_ids = rng.choice(len(self.shards), size=batch_size, p=room / room.sum())
        starts = [(int(s), int(rng.integers(0, room[s] + 1))) for s in shard_ids]
        return self._windows(starts, seq_len)

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """A fixed, evenly spaced set of windows over the split: the same for every evaluation."""
        flat = [(s, o) for s, shard in enumerate(self.shards)
                for o in range(0, len(shard) - seq_len - 1, seq_len)]
        if not flat:
            raise MinilmError(f"{self.directory}: the split has fewer than seq_len + 1 = {seq_len + 1} tokens")
        stride = max(1, len(flat) // max(1, n_batches * batch_size))   # spread the windows over the split
        chosen = flat[::stride][:n_batches * batch_size]
        for i in range(0, len(chosen), batch_size):
            yield self._windows(chosen[i:i + batch_size], seq_len)


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Convert a per-token loss in nats into bits per UTF-8 byte, comparable across tokenizers."""
    return loss_nats / math.log(2) / bytes_per_token
