"""Real text written by people, read from this machine as `Document`s (lesson 05).

    from data_prep.sources import iter_documents
    for doc in iter_documents(["man", "doc"], limit_per_source=100):
        print(doc.id, len(doc.text))

One generator per source, each yielding Documents lazily in sorted-path order, so the raw pool is
the same on every run of the same machine. What exists (lesson 05 measures each):

    stdlib  Python standard library docstrings (always there; the embedded default)
    man     /usr/share/man/man1 and man8: gzip-compressed roff, stripped to plain text here
    doc     /usr/share/doc/*/ README*, NEWS*, changelog*, copyright (very mixed on purpose:
            changelogs and licences are exactly what the quality filters should drop)
    pypi    long descriptions in site-packages' *.dist-info/METADATA (mixed: badges, boilerplate)
    dict    dictd databases under /usr/share/dictd (GCIDE, WordNet, FOLDOC, jargon), optional

Every source except stdlib is optional: a missing directory logs ONE message on the
"minilm.data" logger and yields nothing. Deviations from a full pipeline: the roff stripper is a
small hand-written approximation of `man | col -b` (no tables, no macro expansion), and doc files
are cut at `MAX_DOC_BYTES` (at a line boundary) rather than read whole.
"""

from __future__ import annotations

import email.parser
import gzip
import logging
import re
import sysconfig
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from data_prep.document import Document
from data_prep.pinned import pinned_documents
from data_prep.readers import read_spec
from minilm import MinilmError
from data_prep.stdlib_docs import stdlib_documents

log = logging.getLogger("minilm.data")

# Module-level so tests (and users) can point a source somewhere else.
MAN_DIRS = [Path("/usr/share/man/man1"), Path("/usr/share/man/man8")]
DOC_DIR = Path("/usr/share/doc")
DICT_DIR = Path("/usr/share/dictd")
SITE_PACKAGES = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
MAX_DOC_BYTES = 200_000      # cap per /usr/share/doc file (some changelogs are megabytes)
DICT_DOC_CHARS = 20_000      # dictionary entries are grouped into documents of about this size


def read_text(path: Path, max_bytes: int | None = None) -> str:
    """Read a plain or gzip (also dictzip `.dz`) file as UTF-8, at most `max_bytes` of it."""
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rb") as f:
        data = f.read(max_bytes) if max_bytes else f.read()
    if max_bytes and len(data) == max_bytes:
        data = data[: data.rfind(b"\n") + 1] or data   # do not cut a line in half
    return data.decode("utf-8", errors="replace")


def _missing(name: str, path: Path) -> bool:
    """True (after one log line) when an optional source's directory is absent."""
    if Path(path).is_dir():
        return False
    log.info("optional source %r skipped: %s not present", name, path)
    return True


# ---------------------------------------------------------------- roff (man pages) -> plain text

# Inline escapes, matched left to right so `\\` is consumed before it can start another escape.
_ESCAPE = re.compile(r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)       # font change: \fB \fI \fR \fP \f(CW \f[B]
    | s[+-]?\d                     # point size: \s-1 \s0
    | \((..)                       # two-letter special character: \(em \(bu
    | \[([^\]]*)\]                 # long special character: \[em]
    | \*(?:\(..|\[[^\]]*\]|.)      # string register: \*(lq \*R
    | (.)                          # any other single-character escape
    )""", re.VERBOSE)
_SPECIAL = {"em": "--", "en": "-", "hy": "-", "mi": "-", "bu": "*", "aq": "'", "dq": '"',
            "lq": '"', "rq": '"', "oq": "'", "cq": "'", "co": "(c)", "rg": "(R)", "tm": "(TM)",
            "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "->": "->", "<-": "<-", "mu": "x",
            "de": " degrees", "+-": "+/-", "<=": "<=", ">=": ">="}
_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'",
           "`": "`", ".": "."}   # everything else (\& \, \/ \| \^ \c ...) prints nothing


def _unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        special = m.group(1) or m.group(2)
        if special is not None:
            return _SPECIAL.get(special, "")
        return _SINGLE.get(m.group(3), "") if m.group(3) else ""
    return _ESCAPE.sub(sub, text)


def _args(line: str) -> list[str]:
    r"""A request's arguments, honouring "double quoted" ones and escaped spaces (`\ `):
    '.BR "a b" c\ d' -> ['a b', 'c\ d']."""
    return [q if q else w for q, w in re.findall(r'"([^"]*)"|((?:\\.|\S)+)', line)]


_HEADINGS = {"SH", "SS"}                                  # section titles: own paragraph
_FONT = {"B", "I", "SM", "SB"}                            # args joined with spaces
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}       # args joined with no space
_BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br"}  # paragraph / line breaks


def roff_to_text(roff: str) -> str:
    """Strip a man page's roff to readable plain text (a small `man | col -b`).

    Requests (lines starting with `.` or `'`) keep their text where they carry some (.SH .SS
    .B .I .BR .IR ... and the tag of .IP); everything else (.TH .nf .RS .de macro bodies, comments)
    is dropped. Returns "" for a `.so` redirect, which is only a pointer to another page.
    """
    out: list[str] = []
    in_macro_def, fill, tag_next = False, True, False

    def add(text: str) -> None:        # fill mode: roff joins text lines into one paragraph
        nonlocal tag_next
        if fill and out and out[-1] and text and not tag_next:
            out[-1] += " " + text
        else:
            out.append(text)
        tag_next = tag_next == "TP"    # the line after a .TP is its tag: it stands on its own

    for line in roff.splitlines():
        line = re.sub(r'\\".*', "", line)                 # comment to end of line
        if in_macro_def:
            in_macro_def = not line.startswith("..")
            continue
        if not line.startswith((".", "'")):
            add(line)
            continue
        name, _, rest = line[1:].strip().partition(" ")
        if name == "so":
            return ""
        if name in ("de", "de1", "am", "ig"):
            in_macro_def = True
        elif name in _HEADINGS:
            out += ["", " ".join(_args(rest)).strip(), ""]
        elif name in ("nf", "fi"):                       # no-fill: keep the lines as written
            fill = name == "fi"
            out.append("")
        elif name in _FONT | _ALTERNATING:                # bare ".B" only sets the next line's font
            if rest.strip():
                add(("" if name in _ALTERNATING else " ").join(_args(rest)))
        elif name in _BREAKS:
            out.append("")
            tag_next = "TP" if name == "TP" else False
            if name == "IP" and _args(rest):
                out += [_args(rest)[0], ""]
    text = _unescape("\n".join(out))       # after joining, so escapes never see roff requests
    text = "\n".join(l.rstrip() for l in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- the sources, one generator each

def stdlib_source() -> Iterator[Document]:
    for doc_id, text in stdlib_documents():
        yield Document(id=f"stdlib/{doc_id}", source="stdlib", text=text)


def man_source(dirs: Iterable[Path] | None = None) -> Iterator[Document]:
    """One Document per man page; id like "man/ls.1". `.so` redirects and empty pages skipped."""
    dirs = [Path(d) for d in (MAN_DIRS if dirs is None else dirs)]
    present = [d for d in dirs if d.is_dir()]
    if not present:
        _missing("man", dirs[0] if dirs else Path("/usr/share/man"))
        return
    for d in present:
        for path in sorted(d.iterdir()):
            if not path.is_file() or path.is_symlink():   # symlinks are aliases of other pages
                continue
            text = roff_to_text(read_text(path))
            if text:
                yield Document(id=f"man/{path.name.removesuffix('.gz')}", source="man", text=text)


_DOC_NAMES = re.compile(r"^(README|NEWS|changelog|copyright)", re.IGNORECASE)


def doc_source(root: Path | None = None) -> Iterator[Document]:
    """READMEs, NEWS, changelogs and copyright files at the top of each /usr/share/doc/<pkg>/."""
    root = Path(DOC_DIR if root is None else root)
    if _missing("doc", root):
        return
    for pkg in sorted(root.iterdir()):
        if not pkg.is_dir() or pkg.is_symlink():          # symlinked dirs duplicate another package
            continue
        seen: set[str] = set()
        for path in sorted(pkg.iterdir()):
            name = path.name.removesuffix(".gz")
            if not (path.is_file() and _DOC_NAMES.match(name)) or name in seen:
                continue
            seen.add(name)
            text = read_text(path, MAX_DOC_BYTES).strip()
            if text:
                yield Document(id=f"doc/{pkg.name}/{name}", source="doc", text=text)


def pypi_source(dirs: Iterable[str | Path] | None = None) -> Iterator[Document]:
    """The long description (the body after the header block) of each installed distribution."""
    dirs = [Path(d) for d in (SITE_PACKAGES if dirs is None else dirs)]
    present = [d for d in dirs if d.is_dir()]
    if not present:
        _missing("pypi", dirs[0] if dirs else Path("site-packages"))
        return
    seen: set[str] = set()
    for d in present:
        for meta in sorted(d.glob("*.dist-info/METADATA")):
            msg = email.parser.Parser().parsestr(read_text(meta))
            body = (msg.get_payload() or msg.get("Description") or "").strip()
            name = msg.get("Name") or meta.parent.name.split("-")[0]
            if body and name not in seen:
                seen.add(name)
                yield Document(id=f"pypi/{name}", source="pypi", text=body)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    """dictd's .index stores offsets and lengths as base-64 numbers: "Bq" = 1*64 + 42."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dict_source(root: Path | None = None) -> Iterator[Document]:
    """dictd databases: entries located through the .index, grouped into ~DICT_DOC_CHARS docs."""
    root = Path(DICT_DIR if root is None else root)
    if _missing("dict", root):
        return
    for index in sorted(root.glob("*.index")):
        db = index.name.removesuffix(".index")
        data_path = next((p for p in (root / f"{db}.dict.dz", root / f"{db}.dict") if p.exists()),
                         None)
        if data_path is None:
            continue
        data = read_text(data_path).encode("utf-8")   # offsets are byte offsets
        spans = set()
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and not parts[0].startswith("00-database"):
                spans.add((_b64_number(parts[1]), _b64_number(parts[2])))
        group: list[str] = []
        n = chars = 0
        for off, length in sorted(spans):               # file order: entries in the author's order
            group.append(data[off:off + length].decode("utf-8", errors="replace").strip())
            chars += len(group[-1])
            if chars >= DICT_DOC_CHARS:
                yield Document(id=f"dict/{db}/{n:05d}", source="dict", text="\n\n".join(group))
                group, n, chars = [], n + 1, 0
        if group:
            yield Document(id=f"dict/{db}/{n:05d}", source="dict", text="\n\n".join(group))


SOURCES = {"stdlib": stdlib_source, "man": man_source, "doc": doc_source,
           "pypi": pypi_source, "dict": dict_source, "pinned": pinned_documents}


def iter_documents(names: Iterable[str] | None = None,
                   limit_per_source: int | None = None) -> Iterator[Document]:
    """Documents from the named sources (all of them by default), in registry order; a name with a
    colon is a reader spec for the user's own corpus (data_prep/readers.py, e.g. jsonl:web.jsonl)."""
    for name in (SOURCES if names is None else names):
        if ":" in name:
            yield from islice(read_spec(name), limit_per_source)
            continue
        if name not in SOURCES:
            raise MinilmError(f"unknown source {name!r}; choose from {sorted(SOURCES)} or a reader spec "
                           f"such as files:DIR, jsonl:PATH[:FIELD], parquet:PATH[:COLUMN], hf:NAME")
        yield from islice(SOURCES[name](), limit_per_source)
