"""Lessons cannot drift from the code: every file they name exists, every `function()` is defined."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.md"))
PATH = re.compile(r"\b((?:minilm|data_prep|csrc|benchmarks|tests|lessons)/[\w/.-]+\.(?:py|cpp|cuh|cu|h|md))\b")
CALL = re.compile(r"`(?:[\w.]+\.)?([A-Za-z_]\w*)\([^`]*\)`")  # `name()` or `module.name(args)`


def _defined_names() -> set[str]:
    """Python defs/classes, and C++/CUDA functions (a name followed by `(` on a line that starts a
    definition at column 0, e.g. `int64_t grain(int64_t work_per_item) {`)."""
    names = set()
    for folder in ("minilm", "data_prep", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            names.update(re.findall(r"^\s*(?:def|class)\s+(\w+)", path.read_text(), re.M))
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h"):
            names.update(re.findall(r"^[A-Za-z_].*?\b(\w+)\(", path.read_text(), re.M))
    return names


def test_there_are_lessons():
    assert LESSONS, "lessons/ is empty"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_lesson_names_only_existing_files_and_functions(lesson):
    text = lesson.read_text()
    missing_files = sorted({p for p in PATH.findall(text) if not (ROOT / p).exists()})
    builtins = {"TORCH_LIBRARY", "TORCH_LIBRARY_IMPL", "TORCH_CHECK", "print", "len", "range", "list", "dict", "open", "torch", "pytest", "softmax", "exp",
                "log", "silu", "rms", "mean", "sum", "max", "min", "sqrt", "cos", "sin"}
    defined = _defined_names()
    missing_calls = sorted({n for n in CALL.findall(text) if n not in defined | builtins})
    assert not missing_files, f"{lesson.name} names files that do not exist: {missing_files}"
    assert not missing_calls, f"{lesson.name} names functions that are not defined: {missing_calls}"


def _collected(marker: str) -> set[str]:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", marker, "tests/test_speedrun.py"], cwd=ROOT, capture_output=True, text=True)
    return {line for line in out.stdout.splitlines() if "::" in line}


def test_a_lessons_marker_alone_leaves_the_slow_tests_out():
    # `pytest -m lesson_12` replaces pytest.ini's "not slow"; tests/conftest.py keeps the speedrun
    # tests (minutes each) out unless the expression names `slow`
    plain, with_slow = _collected("lesson_12"), _collected("lesson_12 and slow")
    assert plain and with_slow and not plain & with_slow
    assert any("ci_preset_from_nothing" in name for name in with_slow)
