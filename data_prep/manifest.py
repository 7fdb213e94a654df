"""What the data pipeline reports: per-stage counts kept as documents stream by, and manifest.md.

    log = StageLog("filters", records=f)      # f: where dropped documents are listed, one JSON line each
    log.saw(docs); log.keep(kept); log.drop(bad, reasons)
    with log.timed(): ...                     # seconds spent in the stage, summed over batches
    log.record()                              # the stage's entry in manifest.json
    write_manifest(out, config, corpus, workers, logs, phase_metas)   # manifest.json and manifest.md

A `StageLog` holds counters, not documents: documents and characters in, kept and dropped per
source, drops per reason, input bytes and seconds. Its size depends on the number of sources and
reasons, never on the number of documents, so data_prep/pipeline.py can count a corpus of any
size batch by batch; each stage's counts are what a run holding every document would count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from data_prep.document import Document


class Counts:
    """Documents and characters per source, plus a "total" row, added one document at a time."""

    def __init__(self):
        self.rows: dict[str, dict[str, int]] = {}

    def add(self, docs: Iterable[Document]) -> None:
        for d in docs:
            for key in (d.source, "total"):
                row = self.rows.setdefault(key, {"documents": 0, "characters": 0})
                row["documents"] += 1
                row["characters"] += len(d.text)

    def as_dict(self) -> dict:
        return {**self.rows, "total": self.rows.get("total", {"documents": 0, "characters": 0})}

    def total(self, unit: str = "documents") -> int:
        return self.as_dict()["total"][unit]


class StageLog:
    """What one stage did, counted batch by batch; `record()` is its entry in manifest.json."""

    def __init__(self, name: str, records: TextIO | None = None):
        self.name, self.records = name, records   # records: where dropped documents are listed
        self.docs_in, self.kept, self.dropped = Counts(), Counts(), Counts()
        self.reasons: dict[str, dict[str, int]] = {}
        self.bytes_in, self.seconds = 0, 0.0
        self.extra: dict = {}                     # stage-specific fields, after the common ones

    def saw(self, docs: list[Document]) -> None:
        self.docs_in.add(docs)
        self.bytes_in += sum(len(d.text.encode("utf-8")) for d in docs)

    def keep(self, docs: list[Document]) -> None:
        self.kept.add(docs)

    def passed(self, docs: list[Document]) -> None:
        """A stage that drops nothing: every document in is kept."""
        self.saw(docs)
        self.keep(docs)

    def drop(self, docs: list[Document], reasons: str | list[str]) -> None:
        reasons = [reasons] * len(docs) if isinstance(reasons, str) else reasons
        self.dropped.add(docs)
        for d, r in zip(docs, reasons):
            row = self.reasons.setdefault(r, {"documents": 0, "characters": 0})
            row["documents"] += 1
            row["characters"] += len(d.text)
            if self.records is not None:
                self.records.write(json.dumps({"id": d.id, "source": d.source, "stage": self.name, "reason": r,
                                               "duplicate_of": d.meta.get("duplicate_of")}) + "\n")

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def record(self) -> dict:
        """In/kept/dropped per source, dropped per reason, seconds and input MB (UTF-8) per second."""
        mb_in = self.bytes_in / 1e6
        return {"in": self.docs_in.as_dict(), "kept": self.kept.as_dict(), "dropped": self.dropped.as_dict(),
                "reasons": dict(self.reasons), "seconds": round(self.seconds, 3),
                "mb_per_s": round(mb_in / self.seconds, 3) if self.seconds > 0 else None, **self.extra}


def write_manifest(out: Path, config: dict, corpus: str, workers: int, logs: list[StageLog],
                   phase_metas: dict[str, dict]) -> dict:
    """manifest.json (config, corpus fingerprint, every stage's record, tokens and sources per
    phase) and manifest.md; returns the manifest."""
    manifest = {"config": config, "corpus_fingerprint": corpus, "workers": workers,
                "stages": {log.name: log.record() for log in logs},
                "phases": {name: {s: {k: m["splits"][s][k] for k in ("documents", "tokens", "bytes", "shards")}
                                  for s in ("train", "val")} for name, m in phase_metas.items()},
                "phase_sources": {name: m["sources"] for name, m in phase_metas.items()}}
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
