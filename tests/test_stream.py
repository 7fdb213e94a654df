"""The streamed pipeline (data_prep/pipeline.py, data_prep/stream.py) against an in-memory reference.

    pytest -m lesson_05 tests/test_stream.py

The reference runs the same stages the way a pipeline holding every document would: lists through
`apply_filters`, `deduplicate`, `keep_top`, a tokenizer trained on a list, and token ids from
`tokenizer.encode`. The corpus plants one case of each drop reason, and a near-duplicate chain
A ~ B ~ C with C read before B: a pipeline that only compared each document with earlier ones
would keep C, the global clusters drop it. Then: laziness, the reader is never pulled more than
one batch ahead of what the pipeline has written to disk.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from data_prep import pipeline
from data_prep.classifier import Classifier, RubricAnnotator, keep_top, score_pool
from data_prep.dedup import deduplicate, estimate_jaccard, hash_params, signature
from data_prep.document import Document
from data_prep.filters import apply_filters
from data_prep.ladder import ladder_documents
from data_prep.pinned import pinned_documents
from data_prep.sources import iter_documents
from data_prep.synthetic import SyntheticConfig, synthetic_documents
from minilm.data import is_validation, read_shard
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_05

LICENCE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software, "
           "to deal in the Software without restriction. The software is provided \"as is\", without warranty "
           "of any kind, express or implied, and the above copyright notice shall be included in all copies "
           "of the Software, and in all substantial portions of it, with this permission notice.")


def changed(words: list[str], start: int, step: int, tag: str) -> list[str]:
    return [f"{tag}{i}" if i >= start and (i - start) % step == 0 else w for i, w in enumerate(words)]


def written_corpus(path) -> str:
    """30 speeches plus plants, as a user's JSON-lines file; returns its reader spec."""
    speeches = [d.text for d in pinned_documents() if d.id.startswith("pinned/sotu/")][:40]
    a = speeches[30].split(" ")                    # the chain: J(A, B) ~ J(B, C) ~ 0.87, J(A, C) ~ 0.75
    b = changed(a, 5, 70, "bee")
    c = changed(b, 35, 70, "sea")
    texts = speeches[:30]
    texts[2:2] = [" ".join(a)]
    texts[9:9] = [" ".join(c), speeches[3].upper(), "  \n\n  ", LICENCE]   # C before B; an exact copy
    texts[20:20] = [" ".join(b), "Too short to keep."]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return f"jsonl:{path}"


def config(tmp_path, spec, **overrides) -> pipeline.PipelineConfig:
    fields = dict(out=str(tmp_path / "out"), sources=[spec], vocab_size=300, synthetic=6, ladder=4,
                  annotate_sample=12, keep_fraction=0.4, workers=1, batch_docs=4, progress=False)
    return pipeline.PipelineConfig(**{**fields, **overrides})


def in_memory(cfg: pipeline.PipelineConfig) -> dict:
    """The stages with every document in memory: what the streamed pipeline must reproduce."""
    raw = list(iter_documents(cfg.sources))
    normed = [Document(d.id, d.source, pipeline.normalise(d.text), dict(d.meta)) for d in raw]
    empty = [d for d in normed if not d.text.strip()]
    filtered = apply_filters([d for d in normed if d.text.strip()], cfg.filters)
    deduped = deduplicate(filtered.kept, cfg.dedup)
    pool = deduped.kept
    sample = random.Random(cfg.seed).sample(pool, min(cfg.annotate_sample, len(pool)))
    model = Classifier()
    model.fit(sample, [RubricAnnotator().annotate(d) for d in sample], seed=cfg.seed)
    top = keep_top(pool, score_pool(pool, model), fraction=cfg.keep_fraction)
    top_ids = {d.id for d in top}
    synthetic = (list(synthetic_documents(SyntheticConfig(n_documents=cfg.synthetic, seed=cfg.seed)))
                 + list(ladder_documents(cfg.ladder, seed=cfg.seed)))
    tokenizer = Tokenizer.train([d.text for d in pool if not is_validation(d.id, cfg.val_fraction)],
                                cfg.vocab_size, progress=False)
    dropped = ([(d, "normalise", "empty") for d in empty]
               + [(d, "filters", d.meta["drop_reason"]) for d in filtered.dropped]
               + [(d, "dedup", f"dedup_{d.meta['dedup']}") for d in deduped.dropped]
               + [(d, "classifier", "below_threshold") for d in pool if d.id not in top_ids])
    return {"fingerprint": pipeline.corpus_fingerprint(raw), "tokenizer": tokenizer, "raw": raw,
            "phases": {"phase1": pool, "phase2": top + synthetic}, "deduped": deduped,
            "dropped": [{"id": d.id, "source": d.source, "stage": s, "reason": r,
                         "duplicate_of": d.meta.get("duplicate_of")} for d, s, r in dropped]}


def tokens_of(docs, tokenizer, split, val_fraction) -> np.ndarray:
    ids = [t for d in docs if is_validation(d.id, val_fraction) == (split == "val")
           for t in tokenizer.encode(d.text) + [tokenizer.eot_id]]
    return np.array(ids, dtype=np.int64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    spec = written_corpus(tmp / "web.jsonl")
    small = config(tmp / "small", spec)                      # batches of 4 documents
    large = config(tmp / "large", spec, batch_docs=1000)     # the whole corpus in one batch
    return in_memory(small), (small, pipeline.run_pipeline(small)), (large, pipeline.run_pipeline(large))


def test_the_corpus_plants_a_chain_that_only_global_clusters_drop(runs):
    ref = runs[0]
    by_id = {d.id: d for d in ref["raw"]}
    dup_of = {d.id: d.meta["duplicate_of"] for d in ref["deduped"].dropped}
    a, c = "jsonl/web.jsonl#2", "jsonl/web.jsonl#9"
    assert dup_of[c] == a and dup_of["jsonl/web.jsonl#20"] == a       # C and B both join A's cluster
    sig_a, sig_c = (signature(pipeline.normalise(by_id[i].text), 5, *hash_params(128)) for i in (a, c))
    assert estimate_jaccard(sig_a, sig_c) < 0.8                         # ... though C is not A's copy


def test_streamed_output_equals_the_in_memory_stages(runs):
    ref, (cfg, m), _ = runs
    out = cfg.out
    assert m["corpus_fingerprint"] == ref["fingerprint"]
    records = [json.loads(line) for line in Path(out, "dropped.jsonl").read_text().splitlines()]
    assert records == ref["dropped"]
    assert {r["reason"] for r in records} >= {"empty", "licence", "too_short", "dedup_exact", "dedup_near",
                                              "below_threshold"}
    tokenizer = ref["tokenizer"]
    for phase, docs in ref["phases"].items():
        meta = json.loads(Path(out, phase, "meta.json").read_text())
        assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
        for split in ("train", "val"):
            expected = tokens_of(docs, tokenizer, split, cfg.val_fraction)
            assert np.array_equal(read_shard(f"{out}/{phase}/{split}_000.bin"), expected), (phase, split)
            assert meta["splits"][split]["tokens"] == len(expected) == m["phases"][phase][split]["tokens"]


def test_stage_counts_equal_the_in_memory_ones(runs):
    ref, (_, m), _ = runs
    stages = m["stages"]
    n_raw, pool = len(ref["raw"]), ref["phases"]["phase1"]
    assert stages["read"]["kept"]["total"]["documents"] == n_raw
    assert stages["normalise"]["dropped"]["total"]["documents"] == 1
    assert stages["dedup"]["kept"]["total"]["documents"] == len(pool)
    assert stages["dedup"]["reasons"] == {
        r: {"documents": sum(d.meta["dedup"] == r[6:] for d in ref["deduped"].dropped),
            "characters": sum(len(d.text) for d in ref["deduped"].dropped if d.meta["dedup"] == r[6:])}
        for r in ("dedup_exact", "dedup_near")}
    assert stages["classifier"]["kept"]["total"]["documents"] == round(0.4 * len(pool))
    assert stages["shards_phase2"]["in"]["total"]["documents"] == len(ref["phases"]["phase2"])


def test_the_output_does_not_depend_on_the_batch_size(runs):
    _, (small, m_small), (large, m_large) = runs
    for name in ("dropped.jsonl", "phase1/train_000.bin", "phase1/val_000.bin", "phase2/train_000.bin",
                 "phase2/val_000.bin", "phase1/meta.json", "phase2/meta.json", "phase2/tokenizer.tiktoken"):
        assert Path(small.out, name).read_bytes() == Path(large.out, name).read_bytes(), name
    for stage in m_small["stages"]:
        for part in ("in", "kept", "dropped", "reasons"):
            assert m_small["stages"][stage][part] == m_large["stages"][stage][part], (stage, part)


def test_the_reader_is_never_pulled_more_than_one_batch_ahead(tmp_path, monkeypatch):
    speeches = [d for d in pinned_documents() if d.id.startswith("pinned/sotu/")][:25]
    ahead = []                                  # at each pull: documents read minus documents on disk
    spilled = [0]
    write = pipeline.Spill.write

    def counting_write(self, docs):
        docs = list(docs)
        spilled[0] += len(docs) if self.path.name == "filtered.jsonl" else 0
        write(self, docs)

    def reader(names, limit):
        for n, d in enumerate(speeches):        # every speech passes the filters and is unique
            ahead.append(n - spilled[0])
            yield d

    monkeypatch.setattr(pipeline.Spill, "write", counting_write)
    monkeypatch.setattr(pipeline, "iter_documents", reader)
    m = pipeline.run_pipeline(config(tmp_path, "pinned", batch_docs=5))
    assert m["stages"]["dedup"]["kept"]["total"]["documents"] == spilled[0] == 25
    assert len(ahead) == 25 and max(ahead) == 4  # the 5th of a batch is pulled before the batch is written
