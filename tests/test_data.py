"""Token shards, deterministic sampling, the validation split, bits per byte (lesson 03)."""

import math

import numpy as np
import pytest

from minilm import MinilmError
from minilm.data import (ShardWriter, TokenDataset, bits_per_byte, is_validation, read_shard, token_dtype,
                         unigram_entropy, write_shard)
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_03


def test_shard_round_trip_and_dtype(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)
    assert token_dtype(2048) == np.uint16 and token_dtype(100_352) == np.uint32


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(100, dtype=np.uint16))
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-10])
    with pytest.raises(MinilmError, match="truncated"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 400)
    with pytest.raises(MinilmError, match="not a minilm token shard"):
        read_shard(tmp_path / "junk.bin")


def test_shard_writer_streams_tokens_to_disk_and_cuts_shards_between_batches(tmp_path):
    texts = [f"Document {i} says {'hello ' * (i % 7)}and ends." for i in range(150)]
    tok = Tokenizer.train(texts, 270, progress=False)
    writer = ShardWriter(tok, tmp_path, "train", shard_tokens=2000)
    for t in texts[:ShardWriter.BATCH]:
        writer.add(t)
    assert writer.file.tell() > 256 and not writer.pending      # one batch encoded: on disk, not in memory
    for t in texts[ShardWriter.BATCH:]:
        writer.add(t)
    stats = writer.close()
    # the reference: each batch's ids in one list; a shard closes after the batch that reaches 2000 tokens
    shards, current = [], []
    for i in range(0, len(texts), ShardWriter.BATCH):
        current += [t for text in texts[i:i + ShardWriter.BATCH] for t in tok.encode(text) + [tok.eot_id]]
        if len(current) >= 2000:
            shards, current = shards + [current], []
    shards += [current] if current else []
    found = sorted(tmp_path.glob("train_*.bin"))
    assert len(found) == len(shards) == stats["shards"] > 1 and not list(tmp_path.glob("*.tmp"))
    assert all(np.array_equal(read_shard(f), np.array(ids)) for f, ids in zip(found, shards))
    assert stats["tokens"] == sum(map(len, shards)) and stats["documents"] == 150
    assert stats["bytes"] == sum(len(t.encode()) for t in texts)


def test_prepared_data_has_both_splits_and_meta(data_dir):
    train, val = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    assert train.n_tokens == train.info["tokens"] and val.n_tokens == val.info["tokens"] > 0
    assert 1.5 < train.bytes_per_token < 6  # a 320-token BPE compresses English 2-3x
    assert 0 < train.info["unigram_entropy"] < math.log(320)


def test_batches_are_shifted_windows_and_deterministic(data_dir):
    train = TokenDataset(data_dir, "train")
    x, y = train.batch(4, 32, seed=0, step=3, micro=1)
    assert x.shape == y.shape == (4, 32)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    x2, _ = train.batch(4, 32, seed=0, step=3, micro=1)
    x3, _ = train.batch(4, 32, seed=0, step=3, micro=2)
    assert np.array_equal(x, x2) and not np.array_equal(x, x3)


def test_eval_batches_are_fixed(data_dir):
    val = TokenDataset(data_dir, "val")
    a = [x for x, _ in val.eval_batches(2, 4, 32)]
    b = [x for x, _ in val.eval_batches(2, 4, 32)]
    assert len(a) == 2 and all(np.array_equal(p, q) for p, q in zip(a, b))


def test_validation_split_is_a_stable_function_of_the_document_id():
    ids = [f"doc{i}" for i in range(2000)]
    chosen = [i for i in ids if is_validation(i, 0.1)]
    assert 150 < len(chosen) < 250
    assert chosen == [i for i in ids if is_validation(i, 0.1)]


def test_missing_data_dir_says_to_prepare(tmp_path):
    with pytest.raises(MinilmError, match="minilm prepare"):
        TokenDataset(tmp_path, "train")


def test_unigram_entropy_and_bits_per_byte_by_hand():
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([1, 1, 1, 1])) == pytest.approx(math.log(4))
    # 2 nats per token, 4 bytes per token: 2 / ln 2 bits / 4 bytes
    assert bits_per_byte(2.0, 4.0) == pytest.approx(2 / math.log(2) / 4)
