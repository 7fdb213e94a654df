"""Raw text sources (lesson 05): roff stripping on a hand-written page, a missing source skipped
with one message, a tiny dictd database, and every present source yielding real Documents."""

import gzip
import logging
import textwrap
from pathlib import Path

import pytest

from data_prep import sources
from data_prep.document import Document
from data_prep.sources import SOURCES, iter_documents, roff_to_text
from minilm import MinilmError

pytestmark = pytest.mark.lesson_05

PAGE = textwrap.dedent(r"""
    .\" A hand-written page: comments, fonts, escapes, a tagged paragraph.
    .TH GREET 1 "November 2026" "minilm" "User Commands"
    .SH NAME
    greet \- print a friendly greeting
    .SH SYNOPSIS
    .B greet
    [\fI\,NAME\/\fR]...
    .SH DESCRIPTION
    .B greet
    writes a greeting to standard output \(em one line per
    .IR NAME .
    .PP
    Backslashes print as \e and \&.dots are safe.
    .TP
    \fB\-l\fR, \fB\-\-loud\fR
    shout the greeting
    .SS Exit status
    Zero on success.
    .nf
    greet Ada
    greet Alan
    .fi
""")

EXPECTED = textwrap.dedent(r"""
    NAME

    greet - print a friendly greeting

    SYNOPSIS

    greet [NAME]...

    DESCRIPTION

    greet writes a greeting to standard output -- one line per NAME.

    Backslashes print as \ and .dots are safe.

    -l, --loud
    shout the greeting

    Exit status

    Zero on success.

    greet Ada
    greet Alan
""").strip()


def test_roff_to_text_on_a_hand_written_page():
    assert roff_to_text(PAGE) == EXPECTED


def test_so_redirect_is_skipped():
    assert roff_to_text(".so man1/other.1\n") == ""


def test_escaped_space_stays_inside_an_alternating_font_argument():
    assert roff_to_text(r".BI \-M\  path \fR,\ \fB\-\-manpath= path") == "-M path, --manpath=path"


def test_macro_definitions_and_comments_are_dropped():
    roff = '.de XX\n.B never shown\n..\nkept text \\" a trailing comment\n'
    assert roff_to_text(roff) == "kept text"


@pytest.mark.parametrize("name,attr", [("doc", "DOC_DIR"), ("dict", "DICT_DIR"),
                                       ("man", "MAN_DIRS"), ("pypi", "SITE_PACKAGES")])
def test_missing_source_is_skipped_with_one_message(name, attr, tmp_path, monkeypatch, caplog):
    missing = tmp_path / "not-there"
    monkeypatch.setattr(sources, attr, [missing] if attr in ("MAN_DIRS", "SITE_PACKAGES")
                        else missing)
    with caplog.at_level(logging.INFO, logger="minilm.data"):
        docs = list(iter_documents([name]))
    assert docs == []
    messages = [r.getMessage() for r in caplog.records if r.name == "minilm.data"]
    assert len(messages) == 1 and name in messages[0] and "not present" in messages[0]


def test_unknown_source_name_raises_a_clear_error():
    with pytest.raises(MinilmError, match="unknown source 'nope'.*jsonl:PATH"):
        list(iter_documents(["nope"]))


def test_dictd_database_is_split_into_grouped_entries(tmp_path, monkeypatch):
    entries = ["apple\n  A round fruit.", "banana\n  A long yellow fruit.",
               "cherry\n  A stone fruit."]
    data = "00-database-info\n  header\n" + "\n".join(entries) + "\n"
    raw = data.encode()
    index_lines = ["00-database-info\tA\tZ"]                      # offset 0, length 25: skipped
    b64 = sources._B64
    for word, entry in zip(["apple", "banana", "cherry"], entries):
        off, length = raw.index(entry.encode()), len(entry.encode())
        index_lines.append(f"{word}\t{b64[off // 64]}{b64[off % 64]}\t{b64[length]}")
    (tmp_path / "fruit.index").write_text("\n".join(index_lines) + "\n")
    with gzip.open(tmp_path / "fruit.dict.dz", "wb") as f:
        f.write(raw)
    monkeypatch.setattr(sources, "DICT_DOC_CHARS", 30)           # two entries per document
    docs = list(sources.dict_source(tmp_path))
    assert [d.id for d in docs] == ["dict/fruit/00000", "dict/fruit/00001"]
    assert docs[0].text == entries[0] + "\n\n" + entries[1]
    assert docs[1].text == entries[2]


def _present(name: str) -> bool:
    paths = {"man": sources.MAN_DIRS, "doc": [sources.DOC_DIR], "dict": [sources.DICT_DIR],
             "pypi": [Path(p) for p in sources.SITE_PACKAGES]}.get(name, [])
    return name in ("stdlib", "pinned") or any(Path(p).is_dir() for p in paths)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_present_source_yields_documents(name):
    if not _present(name):
        pytest.skip(f"optional source {name!r} not present on this machine")
    docs = list(iter_documents([name], limit_per_source=20))
    if not docs:
        pytest.skip(f"optional source {name!r} present but empty on this machine")
    assert all(isinstance(d, Document) and d.source == name for d in docs)
    assert all(d.text.strip() for d in docs)
    assert all(d.id.startswith(f"{name}/") for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    # deterministic: a second pass gives the same documents in the same order
    assert [d.id for d in iter_documents([name], limit_per_source=20)] == [d.id for d in docs]
