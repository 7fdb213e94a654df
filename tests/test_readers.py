"""Your own corpus (data_prep/readers.py): every reader on small files written here, weights,
bad specs, and the pipeline over a mixed --sources list. Nothing is downloaded.

    pytest -m lesson_05 tests/test_readers.py -q
"""

import gzip
import json

import pytest

from data_prep.readers import kept, parse_spec, read_spec
from data_prep.sources import iter_documents
from minilm import MinilmError

pytestmark = pytest.mark.lesson_05

TEXTS = [f"Document {i} talks about rivers, boats and the weather at some length." for i in range(6)]


def test_files_reads_txt_and_md_recursively_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Two\nsecond")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.py").write_text("not prose")
    docs = list(read_spec(f"files:{tmp_path}"))
    assert [(d.id, d.source, d.text) for d in docs] == [("files/a.txt", "files", "first"),
                                                         ("files/b/two.md", "files", "# Two\nsecond")]


def test_jsonl_reads_a_field_of_plain_and_gzipped_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS[:3])))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": TEXTS[3]}) + "\n\n")
    docs = list(read_spec(f"jsonl:{tmp_path}:body"))
    assert [d.text for d in docs] == TEXTS[:4] and docs[0].id == "jsonl/a.jsonl#0"
    with pytest.raises(MinilmError, match="line 1: no string field 'text'"):
        list(read_spec(f"jsonl:{tmp_path / 'a.jsonl'}"))


def test_parquet_reads_a_column_in_record_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": TEXTS, "id": list(range(6))}), tmp_path / "part.parquet", row_group_size=2)
    docs = list(read_spec(f"parquet:{tmp_path}:content"))
    assert [d.text for d in docs] == TEXTS and docs[5].id == "parquet/part.parquet#5"
    with pytest.raises(MinilmError, match="no column 'text'"):
        list(read_spec(f"parquet:{tmp_path}"))


def test_hf_streams_a_local_datasets_folder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    docs = list(read_spec(f"hf:{tmp_path}"))
    assert [d.text for d in docs] == TEXTS and docs[0].source == "hf"


def test_a_weight_keeps_a_stable_hashed_share(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)))
    half = [d.id for d in read_spec(f"jsonl:{tmp_path}@0.5")]
    assert 900 < len(half) < 1100 and half == [d.id for d in read_spec(f"jsonl:{tmp_path}@0.5")]
    assert all(kept(i, 0.5) for i in half) and kept("anything", 1.0)


@pytest.mark.parametrize("spec, words", [("csv:data.csv", "KIND one of"), ("files:", "KIND one of"),
                                         ("jsonl:x.jsonl@2", "weight must be in"),
                                         ("jsonl:x.jsonl@half", "weight must be in")])
def test_bad_specs_say_what_is_expected(spec, words):
    with pytest.raises(MinilmError, match=words):
        parse_spec(spec)


def test_named_sources_and_reader_specs_mix_in_one_list(tmp_path):
    (tmp_path / "notes.txt").write_text("my own notes")
    docs = list(iter_documents(["pinned", f"files:{tmp_path}"], limit_per_source=2))
    assert [d.source for d in docs] == ["pinned", "pinned", "files"]


def test_the_pipeline_runs_on_a_users_corpus(tmp_path):
    from data_prep.pinned import pinned_documents
    from data_prep.pipeline import PipelineConfig, run_pipeline
    docs = [d for d in pinned_documents() if d.id.startswith("pinned/sotu/")][:60]   # real prose, as a user's
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    cfg = PipelineConfig(out=str(tmp_path / "out"), sources=[f"jsonl:{tmp_path / 'web.jsonl'}"], vocab_size=300,
                         synthetic=20, ladder=20, annotate_sample=30, workers=1, progress=False)
    manifest = run_pipeline(cfg)
    assert manifest["stages"]["read"]["in"]["jsonl"]["documents"] == 60
    assert manifest["phases"]["phase1"]["train"]["tokens"] > 0


def test_a_corpus_that_filtering_empties_is_a_clear_error(tmp_path):
    from data_prep.pipeline import PipelineConfig, run_pipeline
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": "too short"}) + "\n" for _ in range(5)))
    cfg = PipelineConfig(out=str(tmp_path / "out"), sources=[f"jsonl:{tmp_path / 'web.jsonl'}"], workers=1,
                         progress=False)
    with pytest.raises(MinilmError, match="no document survived: 5 read"):
        run_pipeline(cfg)
