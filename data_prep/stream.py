"""The pieces that let the data pipeline stream: bounded batches, documents on disk, shards as they come.

    for docs in batches(iter_documents(["pinned"]), 1000): ...      # 1000 documents at a time
    spill = Spill("tmp/filtered.jsonl"); spill.write(docs)           # then: for doc in spill: ...
    phase = PhaseWriter("runs/data/x/phase1", "phase1", tokenizer, 0.1); phase.add(docs); phase.close()

data_prep/pipeline.py never holds the corpus: documents flow through it `batch_docs` at a time,
and a stage that must see the whole corpus before it decides (near-duplicate clusters, the
tokenizer, the classifier's top fraction) keeps a few bytes per document while the documents wait
in a `Spill`, a JSON-lines file on disk that is read again, in order, for each later stage.
datatrove's pipelines work the same way: each step reads and writes shards on disk, and only what
a step must share (MinHash buckets, a threshold) is held across documents.

`PhaseWriter` writes one training phase's folder (tokenizer, train/val shards, meta.json) as
documents arrive, through `minilm.data.ShardWriter`, which keeps one batch of tokens in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from data_prep.document import Document
from data_prep.manifest import Counts, StageLog
from minilm import MinilmError
from minilm.data import ShardWriter, is_validation


def batches(items: Iterable, size: int, log: StageLog | None = None) -> Iterator[list]:
    """Lists of up to `size` items, pulled only when asked for. The time spent pulling them (a
    reader's or a generator's cost) is added to `log`."""
    items = iter(items)
    while True:
        start = time.perf_counter()
        batch = list(islice(items, size))
        if log is not None:
            log.seconds += time.perf_counter() - start
        if not batch:
            return
        yield batch


class Spill:
    """Documents in a JSON-lines file: appended once, then read back in order as often as needed.

    Costs disk, not memory: the pipeline spills what survives the filters and reads it again for
    each stage that needs the whole corpus decided first."""

    def __init__(self, path):
        self.path, self.count = Path(path), 0
        self.file = open(self.path, "w", encoding="utf-8")

    def write(self, docs: Iterable[Document]) -> None:
        for d in docs:
            # ensure_ascii (the default) escapes lone surrogates too, so any str reads back equal
            self.file.write(json.dumps([d.id, d.source, d.text, d.meta]) + "\n")
            self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Document]:
        self.file.flush()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                doc_id, source, text, meta = json.loads(line)
                yield Document(doc_id, source, text, meta)

    def close(self) -> None:
        self.file.close()


class PhaseWriter:
    """One training phase's folder, written as documents arrive: the tokenizer's files, train and
    validation shards (chosen per document by `is_validation` of its id) and meta.json, which
    `minilm.data.TokenDataset` reads. meta.json is written last, by `close()`: it marks completion."""

    def __init__(self, out_dir, name: str, tokenizer, val_fraction: float):
        self.out_dir, self.name, self.tokenizer, self.val_fraction = Path(out_dir), name, tokenizer, val_fraction
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(self.out_dir)
        self.splits = {split: ShardWriter(tokenizer, self.out_dir, split) for split in ("train", "val")}
        self.sources = Counts()

    def add(self, docs: Iterable[Document]) -> None:
        for d in docs:
            self.sources.add([d])
            self.splits["val" if is_validation(d.id, self.val_fraction) else "train"].add(d.text)

    def close(self) -> dict:
        splits = {name: writer.close() for name, writer in self.splits.items()}
        if not splits["train"]["documents"] or not splits["val"]["documents"]:
            raise MinilmError(f"{self.name}: {self.sources.total()} documents give an empty train or validation "
                              f"split at val_fraction={self.val_fraction}; raise --limit-per-source")
        tok = self.tokenizer
        meta = {"tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab, "fingerprint": tok.fingerprint()},
                "val_fraction": self.val_fraction, "phase": self.name,
                "sources": {k: v["documents"] for k, v in self.sources.as_dict().items()}, "splits": splits}
        (self.out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        return meta


def write_phase(out_dir, name: str, docs: Iterable[Document], tokenizer, val_fraction: float) -> dict:
    """A phase's folder from any iterable of documents (a list, or a stream)."""
    writer = PhaseWriter(out_dir, name, tokenizer, val_fraction)
    writer.add(docs)
    return writer.close()
