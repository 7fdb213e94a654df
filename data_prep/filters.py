"""Heuristic quality filters: drop documents a reader would call noise, boilerplate or repetition.

    from data_prep.filters import FilterConfig, apply_filters
    result = apply_filters(docs, FilterConfig())   # docs: Iterable[Document]
    result.kept, result.dropped, result.counts     # counts: Counter of drop reasons

Phi-3 (and phi-1 before it) filters web data with a learned "educational value" classifier; a
cheap rule-based pass like this one runs first, as it does in most web pipelines. Most rules and
thresholds are Gopher's (Rae et al. 2021, appendix A, "MassiveWeb" quality and repetition
filters). Each rule is a small function `(text, cfg) -> reason | None`; `apply_filters` runs them
cheapest first and records the FIRST failing reason in `doc.meta["drop_reason"]`.

Deviations from Gopher: we add two rules of our own for the boilerplate our local sources are full
of (licence texts and Debian changelogs); words are `text.split()` (no tokenizer); lines and
paragraphs are compared after stripping whitespace; the duplicated n-gram fractions count only the
repeats of an n-gram, not its first occurrence (Gopher's wording leaves this open; lesson 05 says
why we chose this reading).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from data_prep.document import Document
from data_prep.parallel import parallel_map


@dataclass
class FilterConfig:
    # Gopher: keep 50..100,000 words. Shorter texts carry too little prose to learn from;
    # longer ones are usually dumps (logs, tables).
    min_words: int = 50
    max_words: int = 100_000
    # Gopher: mean word length in [3, 10] characters. Outside it: symbol soup, hashes, base64.
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    # Gopher: at most 0.1 hash or ellipsis symbols per word (tag lists, truncated snippets).
    max_symbol_word_ratio: float = 0.1
    # Gopher: at most 90% of lines start with a bullet (navigation menus, link lists).
    max_bullet_lines: float = 0.9
    # Gopher: at most 30% of lines end with an ellipsis (teasers, truncated previews).
    max_ellipsis_lines: float = 0.3
    # Gopher: at least 80% of words contain an alphabetic character (else numbers/tables/code).
    min_alpha_words: float = 0.8
    # Gopher: at least 2 of these stop words must appear; real English sentences always have them.
    stop_words: tuple = ("the", "be", "to", "of", "and", "that", "have", "with")
    min_stop_words: int = 2
    # Gopher table A1: fraction of lines / paragraphs that duplicate an earlier one, and the share
    # of characters those duplicates hold.
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    # Gopher table A1: share of characters in the single most frequent n-gram, n = 2, 3, 4 ...
    max_top_ngram_char_frac: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # ... and share of characters covered by n-grams that occur more than once, n = 5..10.
    max_dup_ngram_char_frac: dict = field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # Ours: a licence text names at least 2 distinct licence phrases (one alone is just a
    # mention, e.g. a docstring saying "released under the MIT licence").
    min_licence_phrases: int = 2
    # Ours: 5% of lines being Debian changelog headers/sign-offs marks a changelog.
    max_changelog_lines: float = 0.05


# Phrases that open or close the common licences (MIT, BSD, GPL/LGPL, Apache), plus two markers
# of Debian's machine-readable copyright files ("Format: .../copyright-format/1.0/", "License: ").
LICENCE_PHRASES = (
    "permission is hereby granted", "without warranty", "gnu general public license",
    "gnu lesser general public license", "all rights reserved", "redistribution and use",
    "licensed under the apache license", "this program is free software",
    "the above copyright notice", "provided \"as is\"", "copyright-format", "license: ",
)
# A Debian changelog is a stack of entries "pkg (1.2-3) unstable; urgency=low" ... signed off by
# " -- Jane Doe <jane@example.org>  Mon, 01 Jan 2024 10:00:00 +0000".
_CHANGELOG_LINE = re.compile(r"^\S+ \([^)]*\) [^;]*; urgency=|^ -- .+<[^>]+@[^>]+>  \S")
_BULLETS = ("-", "*", "•", "●", "‣", "◦", "–")


# ---- helpers: lines, paragraphs and n-grams (pure, tested on hand-computed examples)

def ngram_firsts(words: list[str], n_max: int) -> list[np.ndarray]:
    """For n = 1..n_max, at index n - 1: first[i] = where the n-gram starting at word i first occurs.

    Equal n-grams share a first position, so it names the n-gram as an integer, and first[i] != i
    marks a repeat. Each n builds on n - 1: the n-gram at i is the (n-1)-gram at i followed by word
    i + n - 1, so it is named by the pair (first_{n-1}[i], first_1[i + n - 1]), packed into one
    int64, and np.unique's first index of each distinct pair is the n-gram's first position. No
    n-gram tuple is ever built; the results equal counting the tuples (tests/test_filters.py).
    """
    index = dict(zip(reversed(words), reversed(range(len(words)))))   # the earliest position wins
    word_first = np.fromiter(map(index.__getitem__, words), np.int64, len(words))
    firsts = [word_first]
    for n in range(2, n_max + 1):   # len(words) - n + 1 n-grams
        pairs = firsts[-1][:-1] * len(words) + word_first[n - 1:]
        _, at, which = np.unique(pairs, return_index=True, return_inverse=True)
        firsts.append(at[which])
    return firsts


def top_ngram_char_frac(words: list[str], n: int, first: np.ndarray | None = None) -> float:
    """Characters in all occurrences of the most frequent n-gram / characters in all words.
    `first`: ngram_firsts(words, n)[n - 1], when the caller has it."""
    first = ngram_firsts(words, n)[n - 1] if first is None else first
    if not len(first):
        return 0.0
    counts = np.bincount(first)   # occurrences, indexed by first position
    at = int(counts.argmax())     # ties: the n-gram that occurs first
    lengths = list(map(len, words))
    return int(counts[at]) * sum(lengths[at:at + n]) / sum(lengths)


def dup_ngram_char_frac(words: list[str], n: int, first: np.ndarray | None = None) -> float:
    """Characters of words inside repeats of an earlier n-gram / characters in all words.

    The first occurrence of an n-gram is not counted, only its repeats: a text that says the same
    thing twice has half its characters redundant, not all of them. (Gopher's wording, "characters
    contained within all duplicate n-grams", leaves this open; counting first occurrences too
    drops half of the stdlib docstrings, whose long modules reuse phrases like "will be called
    with the".) A word inside several overlapping repeats is counted once.
    """
    first = ngram_firsts(words, n)[n - 1] if first is None else first
    repeats = np.flatnonzero(first != np.arange(len(first)))   # n-gram positions, distinct
    # a repeat at i covers words i..i+n-1: +1 where a cover starts, -1 after it ends, running sum > 0
    edges = np.zeros(len(words) + 1, np.int64)
    edges[repeats] += 1
    edges[repeats + n] -= 1
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    total = int(lengths.sum())
    return int(lengths[np.cumsum(edges[:-1]) > 0].sum()) / total if total else 0.0


def dup_fractions(pieces: list[str]) -> tuple[float, float]:
    """(fraction of pieces equal to an earlier piece, fraction of characters in those pieces)."""
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for piece in pieces:
        if piece in seen:
            n_dup += 1
            chars_dup += len(piece)
        seen.add(piece)
    total_chars = sum(len(p) for p in pieces)
    return (n_dup / len(pieces) if pieces else 0.0,
            chars_dup / total_chars if total_chars else 0.0)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# ---- the rules, cheapest first: each returns a drop reason or None

def check_length(text: str, cfg: FilterConfig) -> str | None:
    n = len(text.split())
    if n < cfg.min_words:
        return "too_short"
    return "too_long" if n > cfg.max_words else None


def check_licence(text: str, cfg: FilterConfig) -> str | None:
    lower = text.lower()
    hits = sum(phrase in lower for phrase in LICENCE_PHRASES)
    return "licence" if hits >= cfg.min_licence_phrases else None


def check_changelog(text: str, cfg: FilterConfig) -> str | None:
    lines = text.splitlines()
    hits = sum(bool(_CHANGELOG_LINE.match(ln)) for ln in lines)
    return "changelog" if lines and hits / len(lines) > cfg.max_changelog_lines else None


def check_mean_word_length(text: str, cfg: FilterConfig) -> str | None:
    words = text.split()
    mean = sum(len(w) for w in words) / len(words)
    ok = cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len
    return None if ok else "mean_word_length"


def check_symbol_ratio(text: str, cfg: FilterConfig) -> str | None:
    # "..." and "…" both count as an ellipsis; "...." counts once per three dots (close enough).
    symbols = text.count("#") + text.count("...") + text.count("…")
    return "symbol_ratio" if symbols / len(text.split()) > cfg.max_symbol_word_ratio else None


def check_bullet_lines(text: str, cfg: FilterConfig) -> str | None:
    lines = _lines(text)
    frac = sum(ln.startswith(_BULLETS) for ln in lines) / len(lines)
    return "bullet_lines" if frac > cfg.max_bullet_lines else None


def check_ellipsis_lines(text: str, cfg: FilterConfig) -> str | None:
    lines = _lines(text)
    frac = sum(ln.endswith(("...", "…")) for ln in lines) / len(lines)
    return "ellipsis_lines" if frac > cfg.max_ellipsis_lines else None


def check_alpha_words(text: str, cfg: FilterConfig) -> str | None:
    words = text.split()
    frac = sum(any(map(str.isalpha, w)) for w in words) / len(words)   # words with a letter
    return "non_alpha_words" if frac < cfg.min_alpha_words else None


def check_stop_words(text: str, cfg: FilterConfig) -> str | None:
    present = set(text.lower().split()) & set(cfg.stop_words)
    return "few_stop_words" if len(present) < cfg.min_stop_words else None


def check_repeated_lines(text: str, cfg: FilterConfig) -> str | None:
    frac, char_frac = dup_fractions(_lines(text))
    if frac > cfg.max_dup_line_frac:
        return "dup_lines"
    return "dup_line_chars" if char_frac > cfg.max_dup_line_char_frac else None


def check_repeated_paragraphs(text: str, cfg: FilterConfig) -> str | None:
    # A repeated paragraph repeats its lines too, so this mostly catches many short repeated
    # paragraphs; "dup_paragraph_chars" is rarely the first failure once the line rule has run.
    frac, char_frac = dup_fractions(_paragraphs(text))
    if frac > cfg.max_dup_para_frac:
        return "dup_paragraphs"
    return "dup_paragraph_chars" if char_frac > cfg.max_dup_para_char_frac else None


def _ngram_rule(text: str, limits: dict[int, float], fraction, name: str) -> str | None:
    """The first n whose n-gram character fraction exceeds its limit, as f"{name}_{n}gram"."""
    words = text.split()
    firsts = ngram_firsts(words, max(limits, default=0))   # every n from one chain
    for n, limit in limits.items():
        if fraction(words, n, firsts[n - 1]) > limit:
            return f"{name}_{n}gram"
    return None


def check_top_ngrams(text: str, cfg: FilterConfig) -> str | None:
    return _ngram_rule(text, cfg.max_top_ngram_char_frac, top_ngram_char_frac, "top")


def check_dup_ngrams(text: str, cfg: FilterConfig) -> str | None:
    return _ngram_rule(text, cfg.max_dup_ngram_char_frac, dup_ngram_char_frac, "dup")


RULES: list[Callable[[str, FilterConfig], str | None]] = [
    check_length, check_licence, check_changelog, check_mean_word_length, check_symbol_ratio,
    check_bullet_lines, check_ellipsis_lines, check_alpha_words, check_stop_words,
    check_repeated_lines, check_repeated_paragraphs, check_top_ngrams, check_dup_ngrams,
]


def drop_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first rule that fails for `text`, or None if the text passes them all."""
    for rule in RULES:
        reason = rule(text, cfg)
        if reason is not None:
            return reason
    return None


@dataclass
class FilterResult:
    kept: list[Document]
    dropped: list[Document]
    counts: Counter  # drop reason -> number of dropped documents


def apply_filters(docs: Iterable[Document], cfg: FilterConfig | None = None, workers: int = 1,
                  progress: bool = False) -> FilterResult:
    """Split `docs` into kept and dropped; a dropped doc's reason goes in meta["drop_reason"].

    The rules see one document at a time, so `workers` processes can check them in parallel.
    """
    cfg = cfg or FilterConfig()
    docs = list(docs)
    reasons = parallel_map(partial(drop_reason, cfg=cfg), [d.text for d in docs], workers,
                           desc="filters", progress=progress)
    result = FilterResult(kept=[], dropped=[], counts=Counter())
    for doc, reason in zip(docs, reasons):
        if reason is None:
            result.kept.append(doc)
        else:
            doc.meta["drop_reason"] = reason
            result.dropped.append(doc)
            result.counts[reason] += 1
    return result
