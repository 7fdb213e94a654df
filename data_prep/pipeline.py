"""The whole data recipe in one run: sources -> filters -> dedup -> classifier -> two training phases.

    python -m data_prep.pipeline --out runs/data/pipeline --vocab-size 2048 \
        --sources pinned --synthetic 2000 --ladder 4000     # the defaults; add: stdlib man doc pypi
    minilm train --data-dir runs/data/pipeline/phase1      # then continue on .../phase2

Phi-3 (Abdin et al. 2024, arXiv 2404.14219, section 2) pretrains in two disjoint phases:
phase 1 is mostly filtered web data (general knowledge and language), phase 2 merges a more
heavily filtered subset of that web data (the "educational" part) with synthetic data that
teaches reasoning. Here phase 1 is every document that survives the heuristic filters and
deduplication, and phase 2 is the classifier's top-scored subset plus our synthetic documents.

Each stage is a small function from `data_prep`; this module only orchestrates them and writes a
manifest (`manifest.json`, `manifest.md`) with documents and characters in/kept/dropped per
source and per drop reason, tokens per phase and split, and seconds and MB/s per stage.

Filters and MinHash signatures run in `workers` processes (`data_prep/parallel.py`); the other
stages are cheap or global (dedup's clustering, the classifier's fit) and run in this one.

Deviations from Phi-3: one machine, no sharding of the corpus on disk; the default annotator is a
rule-based rubric (a minilm model can judge instead: `--annotator perplexity:CKPT` or
`judge:CKPT`); both phases share one tokenizer, trained on phase-1 training text only; phase 2
holds the phase-1 documents it selects again (Phi-3 does not say whether its phase-2 web subset
overlaps phase 1); synthetic documents skip the filters (they are clean by construction).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.classifier import Classifier, RubricAnnotator, SourcePriorAnnotator, keep_top, score_pool
from data_prep.dedup import DedupConfig, deduplicate
from data_prep.document import Document
from data_prep.filters import FilterConfig, apply_filters
from data_prep.parallel import default_workers
from data_prep.ladder import ladder_documents
from data_prep.sources import iter_documents
from data_prep.synthetic import SyntheticConfig, synthetic_documents
from data_prep.with_model import TOPIC_SEEDS, JudgeAnnotator, PerplexityAnnotator, model_passages
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.data import build_shards, is_validation
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
    progress: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)


# Named sizes (the speedrun's presets use these names): how much real text is read per source.
PIPELINE_PRESETS = {
    "ci": dict(limit_per_source=40, synthetic=300, ladder=300, annotate_sample=120),  # seconds; proves it runs
    "laptop": dict(limit_per_source=None),                                 # all 927 pinned documents
    "gpu": dict(limit_per_source=None),                                    # every document
}


def pipeline_config(preset: str = "laptop", **overrides) -> PipelineConfig:
    """A PipelineConfig from its named preset, with fields overridden."""
    if preset not in PIPELINE_PRESETS:
        raise MinilmError(f"unknown data preset {preset!r}; choose one of {', '.join(PIPELINE_PRESETS)}")
    return PipelineConfig(**{**PIPELINE_PRESETS[preset], **overrides})


# ---- small pure pieces ----------------------------------------------------------------------------

def corpus_fingerprint(docs: list[Document]) -> str:
    """A short sha256 over every document's id and text, in order: equal iff the corpus is."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:16]


def normalise(text: str) -> str:
    """Unicode NFC, no trailing spaces on any line, runs of more than two blank lines cut to two."""
    text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def tally(docs: list[Document]) -> dict:
    """{source: {documents, characters}} plus a "total" row."""
    out: dict = defaultdict(lambda: {"documents": 0, "characters": 0})
    for d in docs:
        for key in (d.source, "total"):
            out[key]["documents"] += 1
            out[key]["characters"] += len(d.text)
    out["total"]  # present even when docs is empty
    return dict(out)


def stage_record(docs_in: list[Document], kept: list[Document], dropped: list[Document],
                 reasons: list[str], seconds: float) -> dict:
    """What one stage did: in/kept/dropped per source, dropped per reason, time and throughput."""
    by_reason: dict = defaultdict(lambda: {"documents": 0, "characters": 0})
    for d, r in zip(dropped, reasons):
        by_reason[r]["documents"] += 1
        by_reason[r]["characters"] += len(d.text)
    mb_in = sum(len(d.text.encode("utf-8")) for d in docs_in) / 1e6
    return {"in": tally(docs_in), "kept": tally(kept), "dropped": tally(dropped),
            "reasons": dict(by_reason), "seconds": round(seconds, 3),
            "mb_per_s": round(mb_in / seconds, 3) if seconds > 0 else None}


def split(docs: list[Document], val_fraction: float) -> tuple[list, list]:
    """(id, text) pairs for train and validation, chosen per document id (stable as the corpus grows)."""
    pairs = [(d.id, d.text) for d in docs]
    val = [p for p in pairs if is_validation(p[0], val_fraction)]
    train = [p for p in pairs if not is_validation(p[0], val_fraction)]
    return train, val


def write_phase(out_dir: Path, name: str, docs: list[Document], tokenizer, cfg: PipelineConfig) -> dict:
    """Tokenizer files, train/val shards and a meta.json that `minilm.data.TokenDataset` reads."""
    train, val = split(docs, cfg.val_fraction)
    if not train or not val:
        raise MinilmError(f"{name}: {len(docs)} documents give an empty train or validation split "
                          f"at val_fraction={cfg.val_fraction}; raise --limit-per-source")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir)
    meta = {"tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                          "fingerprint": tokenizer.fingerprint()},
            "val_fraction": cfg.val_fraction, "phase": name,
            "sources": {k: v["documents"] for k, v in tally(docs).items()},
            "splits": {"train": build_shards(train, tokenizer, out_dir, "train"),
                       "val": build_shards(val, tokenizer, out_dir, "val")}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completion
    return meta


def _load_model(path: str):
    ck = load_checkpoint(path)
    if ck.tokenizer is None:
        raise MinilmError(f"{path} has no tokenizer; a model annotator or writer needs one")
    return ck


def make_annotator(spec: str):
    """`rubric`, `source`, `perplexity:CHECKPOINT` or `judge:CHECKPOINT` -> an annotator object."""
    kind, _, path = spec.partition(":")
    if kind == "rubric" and not path:
        return RubricAnnotator()
    if kind == "source" and not path:
        return SourcePriorAnnotator()
    if kind in ("perplexity", "judge") and path:
        ck = _load_model(path)
        return (PerplexityAnnotator if kind == "perplexity" else JudgeAnnotator)(ck.model, ck.tokenizer)
    raise MinilmError(f"unknown annotator {spec!r}; use rubric, source, perplexity:CHECKPOINT_DIR "
                      f"or judge:CHECKPOINT_DIR")


# ---- the pipeline ---------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig) -> dict:

    out, stages, clock = Path(cfg.out), {}, time.perf_counter
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or default_workers()
    annotator = make_annotator(cfg.annotator)  # before the slow stages: a bad spec fails at once

    # 1. read the sources.
    t = clock()
    raw = list(tqdm(iter_documents(cfg.sources, cfg.limit_per_source), desc="read", unit="doc",
                    disable=not cfg.progress))
    stages["read"] = stage_record(raw, raw, [], [], clock() - t)
    corpus = corpus_fingerprint(raw)  # the same only when every source gave the same bytes

    # 2. normalise; a document left empty is dropped.
    t = clock()
    normed = [Document(d.id, d.source, normalise(d.text), dict(d.meta)) for d in raw]
    empty = [d for d in normed if not d.text.strip()]
    normed = [d for d in normed if d.text.strip()]
    stages["normalise"] = stage_record(raw, normed, empty, ["empty"] * len(empty), clock() - t)
    stages["normalise"]["characters_trimmed"] = (sum(len(d.text) for d in raw)  # whitespace, NFC merges
                                                 - sum(len(d.text) for d in normed + empty))

    # 3. heuristic filters (Gopher rules + licence/changelog); the first failing rule is the reason.
    t = clock()
    filtered = apply_filters(normed, cfg.filters, workers, cfg.progress)
    stages["filters"] = stage_record(normed, filtered.kept, filtered.dropped,
                                     [d.meta["drop_reason"] for d in filtered.dropped], clock() - t)

    # 4. exact + near (MinHash LSH) deduplication across all sources at once.
    t = clock()
    deduped = deduplicate(filtered.kept, cfg.dedup, workers, cfg.progress)
    stages["dedup"] = stage_record(filtered.kept, deduped.kept, deduped.dropped,
                                   [f"dedup_{d.meta['dedup']}" for d in deduped.dropped], clock() - t)
    pool = deduped.kept
    if not pool:   # nothing for the classifier, the tokenizer or the shards
        raise MinilmError(f"no document survived: {len(raw)} read, {len(normed)} non-empty, "
                          f"{len(filtered.kept)} passed the filters, 0 after deduplication. Add more or "
                          f"longer text to --sources, or loosen the filters (FilterConfig)")

    # 5. classifier: the rubric annotates a sample, logistic regression learns it, then scores the pool.
    t = clock()
    sample = random.Random(cfg.seed).sample(pool, min(cfg.annotate_sample, len(pool)))
    if hasattr(annotator, "annotate_batch"):  # model annotators score the sample in batches
        targets = annotator.annotate_batch(sample)
    else:
        targets = [annotator.annotate(d) for d in tqdm(sample, desc="annotate", disable=not cfg.progress)]
    model = Classifier()
    model.fit(sample, targets, seed=cfg.seed)
    scores = score_pool(pool, model)
    top = keep_top(pool, scores, threshold=cfg.keep_threshold, fraction=cfg.keep_fraction)
    top_ids = {d.id for d in top}
    below = [d for d in pool if d.id not in top_ids]
    stages["classifier"] = stage_record(pool, top, below, ["below_threshold"] * len(below), clock() - t)
    stages["classifier"]["annotated"] = len(sample)

    # 6. synthetic documents (textbook-style exercises, generated and checked by code).
    t = clock()
    synthetic = list(synthetic_documents(SyntheticConfig(n_documents=cfg.synthetic, seed=cfg.seed)))
    synthetic += list(ladder_documents(cfg.ladder, seed=cfg.seed))   # train-split problems only
    if cfg.passage_model:  # phi-1's model-written textbook path (unchecked text, see with_model.py)
        ck = _load_model(cfg.passage_model)
        synthetic += list(tqdm(model_passages(ck.model, ck.tokenizer, TOPIC_SEEDS, cfg.passages_per_topic,
                                              seed=cfg.seed), desc="passages", disable=not cfg.progress))
    stages["synthetic"] = stage_record(synthetic, synthetic, [], [], clock() - t)

    # 7. the two-phase mixture: phase 1 = the filtered, deduplicated "web"; phase 2 = edu subset + synthetic.
    # Splits hash the document id, so a phase-1 validation document stays in validation in phase 2.
    phases = {"phase1": pool, "phase2": top + synthetic}

    # 8. one tokenizer, trained on phase-1 training text, then shards and meta.json for each phase.
    t = clock()
    train_text = [text for _, text in split(pool, cfg.val_fraction)[0]]
    tokenizer = Tokenizer.train(train_text, cfg.vocab_size, progress=cfg.progress)
    stages["tokenizer"] = stage_record(pool, pool, [], [], clock() - t)
    tokens = {}
    for name, docs in phases.items():
        t = clock()
        meta = write_phase(out / name, name, docs, tokenizer, cfg)
        tokens[name] = {s: {k: meta["splits"][s][k] for k in ("documents", "tokens", "bytes", "shards")}
                        for s in ("train", "val")}
        stages[f"shards_{name}"] = stage_record(docs, docs, [], [], clock() - t)

    # 9. the manifest: machine-readable json, a markdown summary, and every dropped document's reason.
    with open(out / "dropped.jsonl", "w") as f:
        for stage, docs, reason in [("normalise", empty, lambda d: "empty"),
                                    ("filters", filtered.dropped, lambda d: d.meta["drop_reason"]),
                                    ("dedup", deduped.dropped, lambda d: f"dedup_{d.meta['dedup']}"),
                                    ("classifier", below, lambda d: "below_threshold")]:
            f.writelines(json.dumps({"id": d.id, "source": d.source, "stage": stage, "reason": reason(d),
                                    "duplicate_of": d.meta.get("duplicate_of")}) + "\n" for d in docs)
    manifest = {"config": asdict(cfg), "corpus_fingerprint": corpus, "workers": workers, "stages": stages,
                "phases": tokens,
                "phase_sources": {n: {k: v["documents"] for k, v in tally(d).items()} for n, d in phases.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (out / "manifest.md").write_text(manifest_markdown(manifest))
    return manifest


def manifest_markdown(m: dict) -> str:
    def mb(chars: int) -> str:
        return f"{chars / 1e6:.2f}"

    def kept(stage: str, src: str) -> int:
        return m["stages"][stage]["kept"].get(src, {}).get("documents", 0)

    lines = ["# Data pipeline manifest", "",
             f"Sources {', '.join(m['config']['sources'])}; corpus fingerprint `{m.get('corpus_fingerprint')}` "
             f"(equal on two machines iff they read the same bytes).", "",
             "| stage | docs in | docs kept | docs dropped | MB in | MB kept | seconds | MB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in m["stages"].items():
        i, k, d = s["in"]["total"], s["kept"]["total"], s["dropped"]["total"]
        lines.append(f"| {name} | {i['documents']} | {k['documents']} | {d['documents']} | "
                     f"{mb(i['characters'])} | {mb(k['characters'])} | {s['seconds']:.2f} | {s['mb_per_s']} |")
    lines += ["", "(MB counts characters / 1e6; MB/s is UTF-8 input bytes per second.)", "",
              "| stage | drop reason | docs | MB |", "|---|---|---:|---:|"]
    for name, s in m["stages"].items():
        for reason, r in sorted(s["reasons"].items(), key=lambda kv: -kv[1]["documents"]):
            lines.append(f"| {name} | {reason} | {r['documents']} | {mb(r['characters'])} |")
    sources = [k for k in m["stages"]["read"]["in"] if k != "total"]
    lines += ["", "| source | read | after filters | after dedup | in phase 2 (top) |", "|---|---:|---:|---:|---:|"]
    for src in sources:
        lines.append(f"| {src} | {kept('read', src)} | {kept('filters', src)} | {kept('dedup', src)} | "
                     f"{kept('classifier', src)} |")
    lines += ["", "| phase | split | documents | tokens | shards |", "|---|---|---:|---:|---:|"]
    for phase, splits in m["phases"].items():
        for sp, s in splits.items():
            lines.append(f"| {phase} | {sp} | {s['documents']} | {s['tokens']} | {s['shards']} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--annotator", default="rubric",
                   help="rubric | source | perplexity:CHECKPOINT | judge:CHECKPOINT (see data_prep/with_model.py)")
    p.add_argument("--passage-model", default="", help="a checkpoint that writes extra phase-2 passages")
    p.add_argument("--passages-per-topic", type=int, default=PipelineConfig.passages_per_topic)


def config_from_args(a: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(out=a.out, sources=a.sources, limit_per_source=a.limit_per_source,
                          vocab_size=a.vocab_size, synthetic=a.synthetic, ladder=a.ladder, annotate_sample=a.annotate_sample,
                          keep_fraction=None if a.keep_threshold is not None else a.keep_fraction,
                          keep_threshold=a.keep_threshold, seed=a.seed, workers=a.workers,
                          annotator=a.annotator, passage_model=a.passage_model,
                          passages_per_topic=a.passages_per_topic)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_pipeline_args(p)
    cfg = config_from_args(p.parse_args(argv))
    manifest = run_pipeline(cfg)
    print((Path(cfg.out) / "manifest.md").read_text())
    return manifest


if __name__ == "__main__":
    main()
