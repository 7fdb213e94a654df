"""The whole data recipe in one run: sources -> filters -> dedup -> classifier -> two training phases.

    python -m data_prep.pipeline --out runs/data/pipeline --vocab-size 2048 \
        --sources pinned --synthetic 2000 --ladder 8000     # the defaults; add: stdlib man doc pypi
    minilm train --data-dir runs/data/pipeline/phase1      # then continue on .../phase2

Phi-3 (Abdin et al. 2024, arXiv 2404.14219, section 2) pretrains in two disjoint phases:
phase 1 is mostly filtered web data (general knowledge and language), phase 2 merges a more
heavily filtered subset of that web data (the "educational" part) with synthetic data that
teaches reasoning. Here phase 1 is every document that survives the heuristic filters and
deduplication, and phase 2 is the classifier's top-scored subset plus our synthetic documents.

It streams: documents flow `batch_docs` at a time, and the stages that must see the whole corpus
before deciding (near-duplicate clusters, the tokenizer, the classifier's top fraction) keep a
few bytes per document while the documents wait on disk (data_prep/stream.py, lesson 05). The
output equals a run that held everything in memory. It writes a manifest (`manifest.json`,
`manifest.md`): documents and characters in/kept/dropped per source and per drop reason, tokens
per phase and split, seconds and MB/s per stage; filters and MinHash run in `workers` processes.

Deviations from Phi-3: one machine; the default annotator is a rule-based rubric (a minilm
model can judge instead: `--annotator perplexity:CKPT` or `judge:CKPT`); both phases share one
tokenizer, trained on phase-1 training text only; phase 2 holds the phase-1 documents it selects
again (Phi-3 does not say whether its phase-2 web subset overlaps phase 1); synthetic documents
skip the filters (they are clean by construction).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.classifier import Classifier, score_threshold
from data_prep.dedup import (DedupConfig, ExactDedup, SignatureFile, cluster, hash_params, lsh_shape, mark_duplicate,
                             signature)
from data_prep.document import Document
from data_prep.filters import FilterConfig, drop_reason
from data_prep.ladder import ladder_documents
from data_prep.manifest import StageLog, write_manifest
from data_prep.parallel import WorkerPool, default_workers
from data_prep.sources import iter_documents
from data_prep.stream import PhaseWriter, Spill, batches
from data_prep.synthetic import SyntheticConfig, synthetic_documents
from data_prep.with_model import TOPIC_SEEDS, load_model, make_annotator, model_passages
from minilm import MinilmError
from minilm.data import is_validation
from minilm.tokenizer import Tokenizer


@dataclass
class PipelineConfig:
    out: str = "runs/data/pipeline"
    sources: list[str] = field(default_factory=lambda: ["pinned"])  # the same bytes on every machine
    limit_per_source: int | None = None   # None: every document of each source
    vocab_size: int = 2048
    val_fraction: float = 0.1
    synthetic: int = 2000                 # synthetic textbook documents added to phase 2
    ladder: int = 8000                    # skill-ladder worksheets (12 worked problems each) in phase 2
    annotate_sample: int = 500            # documents the rubric annotates to train the classifier
    keep_fraction: float | None = 0.3     # phase 2 keeps this best fraction of the pool ...
    keep_threshold: float | None = None   # ... or every document scoring >= this (set one)
    annotator: str = "rubric"             # rubric | source | perplexity:CHECKPOINT | judge:CHECKPOINT
    passage_model: str = ""               # a checkpoint that also writes passages for phase 2 (optional)
    passages_per_topic: int = 2
    seed: int = 0
    workers: int = 0                      # processes for filters and MinHash; 0: every available CPU
    batch_docs: int = 1000                # documents in memory at once; the output does not depend on it
    progress: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


# Named sizes (the speedrun's presets use these names): how much real text is read per source.
PIPELINE_PRESETS = {
    "ci": dict(limit_per_source=40, synthetic=300, ladder=300, annotate_sample=120),  # seconds; proves it runs
    "laptop": dict(limit_per_source=None),                                 # all 927 pinned documents
    "gpu": dict(limit_per_source=None),                                    # every document
}
STAGES = ("read", "normalise", "filters", "dedup", "classifier", "synthetic", "tokenizer",
          "shards_phase1", "shards_phase2")                                # the manifest's order
DROPPING = ("normalise", "filters", "dedup", "classifier")                 # dropped.jsonl's order


def pipeline_config(preset: str = "laptop", **overrides) -> PipelineConfig:
    """A PipelineConfig from its named preset, with fields overridden."""
    if preset not in PIPELINE_PRESETS:
        raise MinilmError(f"unknown data preset {preset!r}; choose one of {', '.join(PIPELINE_PRESETS)}")
    return PipelineConfig(**{**PIPELINE_PRESETS[preset], **overrides})


def fingerprint_update(h, doc: Document) -> None:
    h.update(doc.id.encode() + b"\0" + doc.text.encode() + b"\0")


def corpus_fingerprint(docs) -> str:
    """A short sha256 over every document's id and text, in order: equal iff the corpus is."""
    h = hashlib.sha256()
    for d in docs:
        fingerprint_update(h, d)
    return h.hexdigest()[:16]


def normalise(text: str) -> str:
    """Unicode NFC, no trailing spaces on any line, runs of more than two blank lines cut to two."""
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def synthetic_stream(cfg: PipelineConfig) -> Iterator[Document]:
    """Textbook exercises, ladder worksheets (train-split problems only), and model passages if asked."""
    yield from synthetic_documents(SyntheticConfig(n_documents=cfg.synthetic, seed=cfg.seed))
    yield from ladder_documents(cfg.ladder, seed=cfg.seed)
    if cfg.passage_model:  # phi-1's model-written textbook path (unchecked text, see with_model.py)
        ck = load_model(cfg.passage_model)
        yield from model_passages(ck.model, ck.tokenizer, TOPIC_SEEDS, cfg.passages_per_topic, seed=cfg.seed)


# ---- the streamed passes --------------------------------------------------------------------------

def read_filter_sign(cfg: PipelineConfig, pool: WorkerPool, logs: dict, spill: Spill,
                     signatures: SignatureFile) -> str:
    """Steps 1-4 in one pass over the sources, `batch_docs` documents at a time. The survivors go
    to `spill` and their MinHash signatures to `signatures` (on disk, 512 bytes each); returns the
    corpus fingerprint. Exact dedup remembers a 16-byte key and an id per distinct text (~180
    bytes with Python's overhead), freed when the pass returns."""
    fingerprint, exact = hashlib.sha256(), ExactDedup()
    a, b = hash_params(cfg.dedup.num_perm, cfg.dedup.seed)
    check, sign = partial(drop_reason, cfg=cfg.filters), partial(signature, ngram=cfg.dedup.ngram, a=a, b=b)
    bar = tqdm(desc="read, normalise, filter, minhash", unit="doc", disable=not cfg.progress)
    for raw in batches(iter_documents(cfg.sources, cfg.limit_per_source), cfg.batch_docs, logs["read"]):
        # 1. read: the fingerprint is the same only when every source gave the same bytes.
        for d in raw:
            fingerprint_update(fingerprint, d)
        logs["read"].passed(raw)
        # 2. normalise; a document left empty is dropped.
        with logs["normalise"].timed():
            normed = [Document(d.id, d.source, normalise(d.text), dict(d.meta)) for d in raw]
        logs["normalise"].saw(raw)
        logs["normalise"].drop([d for d in normed if not d.text.strip()], "empty")
        normed = [d for d in normed if d.text.strip()]
        logs["normalise"].keep(normed)
        # 3. heuristic filters (Gopher rules + licence/changelog); the first failing rule is the reason.
        with logs["filters"].timed():
            reasons = pool.map(check, [d.text for d in normed])
        passed = [d for d, r in zip(normed, reasons) if r is None]
        logs["filters"].saw(normed)
        logs["filters"].keep(passed)
        logs["filters"].drop([d for d, r in zip(normed, reasons) if r], [r for r in reasons if r])
        # 4. exact copies of an earlier text are dropped; MinHash signs the rest.
        with logs["dedup"].timed():
            copies = [exact.copy_of(d) for d in passed]
            unique = [d for d, c in zip(passed, copies) if c is None]
            sigs = pool.map(sign, [d.text for d in unique])
        logs["dedup"].saw(passed)
        logs["dedup"].drop([mark_duplicate(d, c, "exact") for d, c in zip(passed, copies) if c], "dedup_exact")
        spill.write(unique)
        signatures.append(np.array(sigs).reshape(-1, cfg.dedup.num_perm))
        bar.update(len(raw))
    bar.close()
    logs["normalise"].extra["characters_trimmed"] = (logs["read"].kept.total("characters")   # whitespace, NFC
                                                     - logs["normalise"].kept.total("characters")
                                                     - logs["normalise"].dropped.total("characters"))
    return fingerprint.hexdigest()[:16]


def drop_near_copies(spill: Spill, roots: np.ndarray, log: StageLog, sample_at: list[int],
                     progress: bool) -> list[Document]:
    """One pass over the spill: each near copy is dropped naming its cluster's first document;
    returns the pool documents at positions `sample_at` (the annotation sample), in that order."""
    wanted, picked = set(sample_at), {}
    first_ids, roots_needed = {}, set(roots[roots != np.arange(len(roots))].tolist())
    pool_index = 0
    for i, doc in enumerate(tqdm(spill, total=len(spill), desc="near copies", disable=not progress)):
        if i in roots_needed:                # a root comes before its copies: its id is read first
            first_ids[i] = doc.id
        if roots[i] != i:
            log.drop([mark_duplicate(doc, first_ids[int(roots[i])], "near")], "dedup_near")
            continue
        log.keep([doc])
        if pool_index in wanted:
            picked[pool_index] = doc
        pool_index += 1
    return [picked[j] for j in sample_at]


def pool_docs(spill: Spill, roots: np.ndarray, desc: str, progress: bool) -> Iterator[Document]:
    """The pool (phase 1): the spilled documents that are the first of their near-duplicate cluster."""
    for i, doc in enumerate(tqdm(spill, total=len(spill), desc=desc, disable=not progress)):
        if roots[i] == i:
            yield doc


def add_to_phase(phase: PhaseWriter, docs: list[Document], log: StageLog) -> None:
    with log.timed():
        phase.add(docs)
    log.passed(docs)


# ---- the pipeline ---------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage, streamed; returns the manifest. Memory: `batch_docs` documents, a shard
    writer's batch, the tokenizer's chunk counts (distinct words, not documents), and per document
    ~180 bytes while reading (exact-dedup keys), ~120 while clustering (one band of its signature,
    union-find), then 16 (cluster root, classifier score). The documents and their signatures wait
    on disk in `out`/.stream-*, removed at the end."""
    if cfg.batch_docs < 1:
        raise MinilmError(f"--batch-docs must be at least 1 (the documents held in memory at once), got {cfg.batch_docs}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or default_workers()
    annotator = make_annotator(cfg.annotator)  # before the slow stages: a bad spec fails at once
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".stream-", dir=out)))
        pool = stack.enter_context(WorkerPool(workers))
        records = {name: stack.enter_context(open(tmp / f"dropped-{name}.jsonl", "w+")) for name in DROPPING}
        logs = {name: StageLog(name, records.get(name)) for name in STAGES}
        spill, signatures = Spill(tmp / "filtered.jsonl"), SignatureFile(tmp / "filtered.minhash", cfg.dedup.num_perm)
        stack.callback(spill.close)
        stack.callback(signatures.close)

        # 1-4. one pass over the sources: read, normalise, filter, drop exact copies, MinHash.
        corpus = read_filter_sign(cfg, pool, logs, spill, signatures)

        # 5. near copies: MinHash LSH clusters over the signatures, read from disk a band at a time.
        with logs["dedup"].timed():
            roots = cluster(signatures, *lsh_shape(cfg.dedup), cfg.dedup.threshold)
        n_pool = int((roots == np.arange(len(roots))).sum())
        if not n_pool:   # nothing for the classifier, the tokenizer or the shards
            raise MinilmError(f"no document survived: {logs['read'].kept.total()} read, "
                              f"{logs['normalise'].kept.total()} non-empty, {logs['filters'].kept.total()} "
                              f"passed the filters, 0 after deduplication. Add more or longer text to "
                              f"--sources, or loosen the filters (FilterConfig)")

        # 6. drop the near copies, pick the annotation sample on the way; the rubric annotates it and
        # logistic regression learns it. The sample is the one random.sample(pool) would draw.
        sample_at = random.Random(cfg.seed).sample(range(n_pool), min(cfg.annotate_sample, n_pool))
        sample = drop_near_copies(spill, roots, logs["dedup"], sample_at, cfg.progress)
        with logs["classifier"].timed():
            if hasattr(annotator, "annotate_batch"):  # model annotators score the sample in batches
                targets = annotator.annotate_batch(sample)
            else:
                targets = [annotator.annotate(d) for d in tqdm(sample, desc="annotate", disable=not cfg.progress)]
            model = Classifier()
            model.fit(sample, targets, seed=cfg.seed)
        logs["classifier"].extra["annotated"] = len(sample)

        # 7. synthetic documents (textbook-style exercises, generated and checked by code), spilled.
        synthetic = Spill(tmp / "synthetic.jsonl")
        stack.callback(synthetic.close)
        for docs in batches(synthetic_stream(cfg), cfg.batch_docs, logs["synthetic"]):
            synthetic.write(docs)
            logs["synthetic"].passed(docs)

        # 8. one tokenizer for both phases, trained on phase-1 training text (it keeps chunk counts).
        def train_text() -> Iterator[str]:
            for d in pool_docs(spill, roots, "tokenizer", cfg.progress):
                logs["tokenizer"].passed([d])
                if not is_validation(d.id, cfg.val_fraction):
                    yield d.text
        with logs["tokenizer"].timed():
            tokenizer = Tokenizer.train(train_text(), cfg.vocab_size, progress=cfg.progress)

        # 9. phase 1 = the filtered, deduplicated pool; the classifier scores it on the way (8 bytes each).
        # Splits hash the document id, so a phase-1 validation document stays in validation in phase 2.
        phases = {name: PhaseWriter(out / name, name, tokenizer, cfg.val_fraction) for name in ("phase1", "phase2")}
        scores, n = np.empty(n_pool), 0
        for docs in batches(pool_docs(spill, roots, "phase1", cfg.progress), cfg.batch_docs):
            with logs["classifier"].timed():
                scores[n:n + len(docs)] = model.predict(docs)
            n += len(docs)
            add_to_phase(phases["phase1"], docs, logs["shards_phase1"])

        # 10. phase 2 = the pool's top-scored part, then the synthetic documents.
        threshold, n = score_threshold(scores, cfg.keep_threshold, cfg.keep_fraction), 0
        for docs in batches(pool_docs(spill, roots, "phase2", cfg.progress), cfg.batch_docs):
            is_top = scores[n:n + len(docs)] >= threshold
            top = [d for d, t in zip(docs, is_top) if t]
            n += len(docs)
            logs["classifier"].saw(docs)
            logs["classifier"].keep(top)
            logs["classifier"].drop([d for d, t in zip(docs, is_top) if not t], "below_threshold")
            add_to_phase(phases["phase2"], top, logs["shards_phase2"])
        for docs in batches(synthetic, cfg.batch_docs):
            add_to_phase(phases["phase2"], docs, logs["shards_phase2"])
        metas = {}
        for name, phase in phases.items():
            with logs[f"shards_{name}"].timed():
                metas[name] = phase.close()

        # 11. the manifest: machine-readable json, a markdown summary, and every dropped document's reason.
        with open(out / "dropped.jsonl", "w") as f:
            for name in DROPPING:
                records[name].seek(0)
                shutil.copyfileobj(records[name], f)
    return write_manifest(out, asdict(cfg), corpus, workers, [logs[name] for name in STAGES], metas)


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The pipeline's flags; `python -m data_prep.pipeline` and `minilm data` both use them."""
    p.add_argument("--out", default=PipelineConfig.out)
    p.add_argument("--vocab-size", type=int, default=PipelineConfig.vocab_size)
    p.add_argument("--sources", nargs="+", default=PipelineConfig().sources)
    p.add_argument("--limit-per-source", type=int, default=None)
    p.add_argument("--synthetic", type=int, default=PipelineConfig.synthetic)
    p.add_argument("--ladder", type=int, default=PipelineConfig.ladder, help="skill-ladder worksheets in phase 2")
    p.add_argument("--annotate-sample", type=int, default=PipelineConfig.annotate_sample)
    p.add_argument("--keep-fraction", type=float, default=PipelineConfig.keep_fraction)
    p.add_argument("--keep-threshold", type=float, default=None, help="overrides --keep-fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes for filters and MinHash; 0: all CPUs")
    p.add_argument("--batch-docs", type=int, default=PipelineConfig.batch_docs,
                   help="documents held in memory at once (the output does not depend on it)")
    p.add_argument("--annotator", default="rubric",
                   help="rubric | source | perplexity:CHECKPOINT | judge:CHECKPOINT (see data_prep/with_model.py)")
    p.add_argument("--passage-model", default="", help="a checkpoint that writes extra phase-2 passages")
    p.add_argument("--passages-per-topic", type=int, default=PipelineConfig.passages_per_topic)


def config_from_args(a: argparse.Namespace) -> PipelineConfig:
    """The config the flags name (every flag is a field); --keep-threshold replaces --keep-fraction."""
    fields = {k: v for k, v in vars(a).items() if k in PipelineConfig.__dataclass_fields__}
    return PipelineConfig(**{**fields, **({"keep_fraction": None} if a.keep_threshold is not None else {})})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pipeline_args(p)
    cfg = config_from_args(p.parse_args(argv))
    manifest = run_pipeline(cfg)
    print((Path(cfg.out) / "manifest.md").read_text())
    return manifest


if __name__ == "__main__":
    main()
