"""The pinned corpus is the same bytes everywhere, and a changed file is refused (data_prep/pinned.py).

    pytest -m lesson_05 tests/test_pinned.py -q
"""

import lzma

import pytest

import data_prep.pinned as pinned
from data_prep.pipeline import corpus_fingerprint
from data_prep.sources import iter_documents
from minilm import MinilmError

pytestmark = pytest.mark.lesson_05


def test_the_pinned_corpus_loads_checked_sorted_and_licensed():
    docs = list(pinned.pinned_documents())
    assert len(docs) == 927
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {d.meta["origin"] for d in docs} == {"sotu", "moby-dick", "canterbury", "jargon", "devils-dictionary"}
    assert all(d.text.strip() and d.text.endswith("\n") and "\r" not in d.text for d in docs)
    assert all("public domain" in d.meta["licence"] or "CC0" in d.meta["licence"] for d in docs)
    assert sum(len(d.text) for d in docs) > 14_000_000     # ~14.7M characters of prose


def test_it_is_a_source_like_any_other_and_its_fingerprint_is_fixed():
    docs = list(iter_documents(["pinned"], limit_per_source=5))
    assert [d.source for d in docs] == ["pinned"] * 5
    assert docs[0].id == "pinned/canterbury/alice29#0" and docs[0].text.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert corpus_fingerprint(docs) == corpus_fingerprint(list(iter_documents(["pinned"], limit_per_source=5)))
    assert corpus_fingerprint(docs) != corpus_fingerprint(docs[:4])


def test_a_changed_corpus_file_is_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "corpus.jsonl.xz"
    data = lzma.decompress(pinned.PINNED.read_bytes()).replace(b"Ishmael", b"Ismael", 1)
    tampered.write_bytes(lzma.compress(data))
    monkeypatch.setattr(pinned, "PINNED", tampered)
    pinned._records.cache_clear()
    with pytest.raises(MinilmError, match="not the pinned version"):
        list(pinned.pinned_documents())
    tampered.write_bytes(pinned.PINNED.read_bytes()[:1000])
    pinned._records.cache_clear()
    with pytest.raises(MinilmError, match="cannot read the pinned corpus"):
        list(pinned.pinned_documents())
    monkeypatch.undo()
    pinned._records.cache_clear()


def test_the_qa_table_is_pinned_and_the_qa_environment_never_reads_this_machines_stdlib(tmp_path, monkeypatch):
    table = pinned.pinned_stdlib_qa()
    assert table["python"] == "3.11.7" and len(table["functions"]) == 404 and len(table["summaries"]) == 44
    assert ["shutil.copymode", "Copy mode bits from src to dst"] in table["functions"]
    assert table["summaries"]["textwrap"] == "Text wrapping and filling"
    import data_prep.stdlib_docs
    from minilm.agents.envs import make_env, qa
    before = (qa.corpus.cache_clear(), qa.corpus())[1]
    # a machine whose stdlib is elsewhere (or another Python) builds the same environment
    monkeypatch.setattr(data_prep.stdlib_docs, "stdlib_dir", lambda: tmp_path)
    qa.corpus.cache_clear()
    assert qa.corpus() == before
    env = make_env("qa", "test")
    assert env.reset(seed=5).startswith("Your task is to: answer the question.")


def test_a_changed_qa_table_is_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "qa.json.xz"
    tampered.write_bytes(lzma.compress(lzma.decompress(pinned.PINNED_QA.read_bytes()).replace(b"Text", b"Txet", 1)))
    monkeypatch.setattr(pinned, "PINNED_QA", tampered)
    pinned.pinned_stdlib_qa.cache_clear()
    with pytest.raises(MinilmError, match="QA table .* is not the pinned version.*--qa"):
        pinned.pinned_stdlib_qa()
    monkeypatch.undo()
    pinned.pinned_stdlib_qa.cache_clear()
