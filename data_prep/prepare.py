"""Ready-made corpora: the quick one-phase stdlib corpus, and the pipeline's default two phases.

    prepare_data("runs/data/stdlib-2048", vocab_size=2048)   # stdlib docstrings -> tokenizer -> shards
    minilm prepare --data-dir runs/data/stdlib-2048           # the same from the command line
    phase1, phase2 = default_data(vocab_size=2048, docs_per_source=400)   # `minilm train`'s default

The full data recipe (filters, dedup, classifier, synthetic data, two phases) is data_prep/pipeline.py;
`default_data` runs it once per vocabulary size into runs/data/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from data_prep.pipeline import PipelineConfig, run_pipeline
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


def default_data(vocab_size: int, docs_per_source: int, build: bool = True, wait: bool = False,
                 poll_s: float = 5.0) -> tuple[Path, Path]:
    """(phase 1, phase 2) of the data pipeline on the pinned corpus, built once per vocab size.

    Phi-3's two phases (lesson 05): filtered real text, then its most educational part plus
    synthetic textbook data. `phase2/meta.json` is the pipeline's last shard write, so its
    presence means a complete run: with `wait` (torchrun ranks > 0) this polls for it while rank 0
    builds. A file, not a collective: building can take longer than a barrier's timeout."""
    root = Path(f"runs/data/pinned-{vocab_size}" + (f"-{docs_per_source}" if docs_per_source else ""))
    done = root / "phase2" / "meta.json"
    if build and not done.exists():
        tqdm.write(f"building the training data in {root} (data_prep/pipeline.py; once per vocab size)")
        run_pipeline(PipelineConfig(out=str(root), vocab_size=vocab_size,
                                    limit_per_source=docs_per_source or None))
    while wait and not done.exists():
        time.sleep(poll_s)
    return root / "phase1", root / "phase2"
