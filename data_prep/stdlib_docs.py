"""The embedded default corpus: docstrings of the Python standard library.

Every Python installation carries a few megabytes of English prose written by people: the
docstrings of the standard library. It is technical, mostly well written, and needs no download,
which makes it minilm's default pretraining text (lesson 05 compares it with the other sources).

    from data_prep.stdlib_docs import stdlib_documents
    docs = list(stdlib_documents())        # [(doc_id, text), ...], one per module

One document per module: its module docstring followed by the docstrings of its classes and
functions, in source order. Test suites and vendored third-party code are skipped.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Directories whose docstrings are not prose (tests) or not the stdlib's own (vendored code).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "_vendor", "ensurepip", "lib2to3"}


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Yield the module docstring, then every class/function docstring in source order."""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 3:  # one- or two-word docstrings carry no prose
            yield doc


def stdlib_documents(root: Path | None = None, min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """Yield `(doc_id, text)` for every stdlib module with at least `min_chars` of docstrings.

    `doc_id` is the module's path relative to the stdlib root, e.g. `json/decoder.py`. The order
    is sorted by path, so the corpus is the same on every run of the same Python.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library sources not found at {root}; pass root=")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken (bad-syntax fixtures)
        text = "\n\n".join(_docstrings(tree))
        if len(text) >= min_chars:
            yield str(rel), text
