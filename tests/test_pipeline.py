"""The end-to-end data pipeline (data_prep/pipeline.py) on a tiny corpus with planted problems.

    pytest -m lesson_05 tests/test_pipeline.py

60 stdlib documents plus an exact copy of one, a near copy of another (one word changed) and a
licence text are fed in by replacing `iter_documents`; the pipeline must drop each plant with
the right reason, keep its books balanced, and write two phases that minilm can train on.
"""

import json

import pytest
import torch
from conftest import tiny_config

from data_prep import pipeline
from data_prep.document import Document
from data_prep.sources import iter_documents
from minilm.config import build
from minilm.data import TokenDataset
from minilm.stages.pretrain import TrainConfig, train

pytestmark = pytest.mark.lesson_05

LICENCE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
           "software and associated documentation files, to deal in the Software without restriction, "
           "including without limitation the rights to use, copy, modify, merge, publish, distribute, "
           "sublicense, and sell copies of the Software, subject to the following conditions: the above "
           "copyright notice and this permission notice shall be included in all copies or substantial "
           "portions of the Software. The software is provided \"as is\", without warranty of any kind.")


def planted_corpus(names, limit):
    docs = list(iter_documents(["stdlib"], 60))
    longest = sorted(docs, key=lambda d: len(d.text.split()), reverse=True)
    words = longest[1].text.split(" ")
    words[len(words) // 2] = "zebra"
    return docs + [Document("stdlib/planted-exact", "stdlib", longest[0].text),
                   Document("stdlib/planted-near", "stdlib", " ".join(words)),
                   Document("stdlib/planted-licence", "stdlib", LICENCE)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "iter_documents", planted_corpus)
    cfg = pipeline.PipelineConfig(out=str(out), sources=["stdlib"], limit_per_source=60, vocab_size=300,
                                  synthetic=50, ladder=20, annotate_sample=40, keep_fraction=0.5, progress=False)
    try:
        return out, pipeline.run_pipeline(cfg)
    finally:
        mp.undo()


def test_normalise():
    assert pipeline.normalise("e\u0301 \t\nb  \n\n\n\n\n\nc\n") == "\u00e9\nb\n\n\nc"  # five blank lines become two


def count(stage: dict, part: str, src: str, unit: str) -> int:
    return stage[part].get(src, {}).get(unit, 0)


def test_every_stage_balances_its_books(run):
    _, m = run
    for name, s in m["stages"].items():
        for src in s["in"]:
            assert count(s, "in", src, "documents") == (count(s, "kept", src, "documents")
                                                        + count(s, "dropped", src, "documents")), (name, src)
        trimmed = s.get("characters_trimmed", 0)   # only normalise shortens the documents it keeps
        assert count(s, "in", "total", "characters") == (count(s, "kept", "total", "characters")
                                                         + count(s, "dropped", "total", "characters") + trimmed)
        assert sum(r["documents"] for r in s["reasons"].values()) == s["dropped"]["total"]["documents"]
    assert m["stages"]["read"]["in"]["total"]["documents"] == 63
    # each stage's input is the previous stage's output
    assert m["stages"]["filters"]["in"]["total"] == m["stages"]["normalise"]["kept"]["total"]
    assert m["stages"]["dedup"]["in"]["total"] == m["stages"]["filters"]["kept"]["total"]
    assert m["stages"]["classifier"]["in"]["total"] == m["stages"]["dedup"]["kept"]["total"]


def test_planted_documents_dropped_for_the_right_reason(run):
    out, m = run
    dropped = {r["id"]: r for r in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())}
    assert dropped["stdlib/planted-licence"]["reason"] == "licence"
    assert dropped["stdlib/planted-exact"]["reason"] == "dedup_exact"
    assert dropped["stdlib/planted-near"]["reason"] == "dedup_near"
    assert m["stages"]["filters"]["reasons"]["licence"]["documents"] >= 1
    assert m["stages"]["dedup"]["reasons"]["dedup_exact"]["documents"] >= 1
    assert m["stages"]["dedup"]["reasons"]["dedup_near"]["documents"] >= 1
    assert m["stages"]["classifier"]["reasons"]["below_threshold"]["documents"] >= 1
    assert "| dedup | dedup_exact |" in (out / "manifest.md").read_text()
    assert len(m["corpus_fingerprint"]) == 16 and m["corpus_fingerprint"] in (out / "manifest.md").read_text()


def test_phases_load_and_phase2_holds_synthetic(run):
    out, m = run
    assert m["phase_sources"]["phase2"]["synthetic"] == 50 + 20    # textbook documents + ladder worksheets
    assert "synthetic" not in m["phase_sources"]["phase1"]
    for phase in ("phase1", "phase2"):
        for split in ("train", "val"):
            data = TokenDataset(out / phase, split)
            assert data.n_tokens == m["phases"][phase][split]["tokens"] > 0


def test_three_training_steps_on_phase1(run, tmp_path):
    out, _ = run
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build(TrainConfig, preset="tiny", model=tiny_config(n_layer=1, d_model=32, n_head=2, n_kv_head=1).to_dict(),
                          out_dir=str(tmp_path / "train"), data_dir=str(out / "phase1"), batch_size=4,
                          seq_len=32, max_steps=3, lr=1e-2, warmup_steps=1, eval_every=3, eval_batches=1,
                          ckpt_every=3, log_every=1, device="cpu")
        train(cfg)
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "train" / "metrics.jsonl").exists()


def test_every_flag_reaches_its_config_field():
    import argparse
    p = argparse.ArgumentParser()
    pipeline.add_pipeline_args(p)
    assert pipeline.config_from_args(p.parse_args([])) == pipeline.PipelineConfig()   # defaults agree
    cfg = pipeline.config_from_args(p.parse_args(["--workers", "3", "--batch-docs", "7", "--sources", "pinned", "man",
                                                  "--keep-threshold", "0.5", "--ladder", "11"]))
    assert (cfg.workers, cfg.batch_docs, cfg.sources, cfg.ladder) == (3, 7, ["pinned", "man"], 11)
    assert (cfg.keep_threshold, cfg.keep_fraction) == (0.5, None)   # a threshold replaces the fraction
