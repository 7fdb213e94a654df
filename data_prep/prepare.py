"""The quick one-phase corpus: the Python standard library's docstrings, tokenized into shards.

    prepare_data("runs/data/stdlib-2048", vocab_size=2048)   # corpus -> tokenizer -> shards
    minilm prepare --data-dir runs/data/stdlib-2048           # the same from the command line

The full data recipe (filters, dedup, classifier, synthetic data, two phases) is data_prep/pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from data_prep.stdlib_docs import stdlib_documents
from minilm import MinilmError
from minilm.data import build_shards, is_validation
from minilm.tokenizer import Tokenizer


def prepare_data(out_dir, vocab_size: int, documents: Iterable[tuple[str, str]] | None = None,
                 val_fraction: float = 0.1, progress: bool = True) -> Path:
    """Corpus -> train/val split -> BPE tokenizer (trained on train) -> shards + meta.json.

    `documents` defaults to the embedded corpus (Python stdlib docstrings, data_prep/stdlib_docs.py).
    Skipped when `out_dir/meta.json` exists; delete the directory to rebuild.
    """
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists():
        return out_dir
    if documents is None:
        documents = stdlib_documents()
    docs = list(documents)
    train_docs = [d for d in docs if not is_validation(d[0], val_fraction)]
    val_docs = [d for d in docs if is_validation(d[0], val_fraction)]
    if not train_docs or not val_docs:
        raise MinilmError(f"corpus of {len(docs)} documents gives an empty train or validation split "
                          f"at val_fraction={val_fraction}; add documents")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.train((t for _, t in train_docs), vocab_size, progress=progress)
    tokenizer.save(out_dir)
    meta = {"tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                          "fingerprint": tokenizer.fingerprint()},
            "val_fraction": val_fraction,
            "splits": {"train": build_shards(train_docs, tokenizer, out_dir, "train"),
                       "val": build_shards(val_docs, tokenizer, out_dir, "val")}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completion
    return out_dir
