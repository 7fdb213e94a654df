"""Tests for the compiled pre-tokenizer (csrc/tokenizer/pretokenize.cpp via minilm/ops/bpe.py), lesson 02.

The reference is the `regex` module itself: the compiled split must give regex.findall's chunks, one for
one, for SPLIT_PATTERN and GPT4_SPLIT_PATTERN, on hypothesis-drawn text full of Unicode corner cases,
on code points sampled from all of Unicode, and on real text; its counts must be count_chunks' regex
counts, in the same order; training on them must give the same merges.
"""

import itertools

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.pinned import pinned_documents
from data_prep.stdlib_docs import stdlib_documents
from minilm.ops import bpe
from minilm.ops._kernels import LOAD_ERROR, LOADED
from minilm.bpe_train import GPT4_SPLIT_PATTERN, SPLIT_PATTERN, count_chunks
from minilm.tokenizer import Tokenizer

pytestmark = [pytest.mark.lesson_02,
              pytest.mark.skipif(not LOADED, reason=f"minilm._C is not built ({LOAD_ERROR})")]

PATTERNS = [(SPLIT_PATTERN, 1), (GPT4_SPLIT_PATTERN, 3)]   # (pattern, its max_digits)

# Letters of many scripts (S/s and U+017F long s, Kelvin sign, dotted I, Greek, Cyrillic, Hebrew, Arabic,
# CJK, kana, Hangul, Thai, math bold A, CJK extension B), marks (combining acute, a Devanagari vowel sign,
# a variation selector), numbers (ASCII, Arabic-Indic, fullwidth, superscript two, Roman twelve, one half),
# every kind of whitespace and two controls that `regex` does not count as \s (U+001C, NUL), punctuation
# (apostrophes straight and curly, quotes, underscore) and emoji with a skin tone and a zero-width joiner.
ALPHABET = ("aZeLlTtSsMmDdVvRrEeſKİΩжאع東ア한ก𝐀𠀀" "\u0301\u093f\ufe0f" "07٣٩０９²Ⅻ½"
            " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000" "\x1c\x00"
            "'’\".,!?-_()«»;" "🦜👍🏽\u200d")
PIECES = ["'s", "'LL", "'Ve", "'rE", "'ſ", "'d", "'x", " 'll", "don't", "I'M", "\r\n", "\n\n", "  ", "   \n",
          "!!\n\n", " ...\r\n", "1234567", "٣٤٥", "x=42;", "\u3000\u3000a", "\t\tdef", " \u0301x"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(alphabet=ALPHABET, max_size=6),
                           st.characters(exclude_categories=("Cs",))), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_compiled_split_is_regex_findall_chunk_for_chunk(s):
    for pattern, max_digits in PATTERNS:
        assert bpe.compiled_split(s, max_digits) == regex.findall(pattern, s)


@pytest.mark.parametrize("s", ["", "'LL'Ve're", "it'ſa", "a  \n\n  b", "end  \n ", "x\u3000\u3000y", "x\x1c\x1cy",
                               "!!!\n\n\nword", " ?!\r\n\r\n", "\u0301\u0301a", "١٢٣٤ ０１２３", "🦜\u200d🦜 x",
                               "tab\t\tx", "\x85\x85word", " \n", "'", "' ", "12'345"])
def test_compiled_split_on_hand_picked_corner_cases(s):
    for pattern, max_digits in PATTERNS:
        assert bpe.compiled_split(s, max_digits) == regex.findall(pattern, s)


def _code_point_text(code_points) -> str:
    """Each code point alone, after a letter and before a space, so every class meets its neighbours."""
    return "".join(f"{c}a{c} {c}" for c in map(chr, code_points) if not 0xD800 <= ord(c) < 0xE000)


def test_compiled_split_on_code_points_sampled_from_all_of_unicode():
    table = bpe.unicode_classes()
    changes = (torch.nonzero(table[1:] != table[:-1]).flatten() + 1).tolist()   # where the class changes
    sample = sorted({*range(0, bpe.N_CODE_POINTS, 61), *changes, *(c - 1 for c in changes)})
    text = _code_point_text(sample)
    assert bpe.compiled_split(text, 1) == regex.findall(SPLIT_PATTERN, text)


@pytest.mark.slow
def test_compiled_split_on_every_code_point():
    text = _code_point_text(range(bpe.N_CODE_POINTS))
    assert bpe.compiled_split(text, 1) == regex.findall(SPLIT_PATTERN, text)


@pytest.fixture(scope="module")
def real_texts():
    """~1 MB of English prose (every 15th document of the pinned corpus) and ~0.3 MB of stdlib docstrings."""
    prose = [doc.text for doc in itertools.islice(pinned_documents(), 0, None, 15)]
    return prose + [text for _, text in itertools.islice(stdlib_documents(), 60)]


def test_compiled_split_on_real_text(real_texts):
    text = "\n".join(real_texts[:10] + real_texts[-50:])
    assert bpe.compiled_split(text, 1) == regex.findall(SPLIT_PATTERN, text)


@pytest.mark.parametrize("pattern", [SPLIT_PATTERN, GPT4_SPLIT_PATTERN], ids=["split", "gpt4"])
def test_compiled_counts_are_the_regex_counts_in_the_same_order(real_texts, pattern):
    compiled = count_chunks(real_texts, pattern)
    reference = count_chunks(real_texts, pattern, backend="python")
    assert list(compiled.items()) == list(reference.items())


def test_compiled_counts_do_not_depend_on_batches_or_threads(real_texts):
    texts = real_texts[:60] + ["", "", "tail  "]
    one_batch = bpe.compiled_chunk_counts(texts, 1)
    assert list(bpe.compiled_chunk_counts(texts, 1, batch_bytes=10_000).items()) == list(one_batch.items())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert list(bpe.compiled_chunk_counts(texts, 1).items()) == list(one_batch.items())
    finally:
        torch.set_num_threads(threads)
    assert bpe.compiled_chunk_counts([], 1) == {} and bpe.compiled_chunk_counts(["", ""], 1) == {}


def test_training_with_the_compiled_split_gives_the_reference_merges(real_texts):
    fast = Tokenizer.train(real_texts, vocab_size=800, progress=False)                  # compiled
    slow = Tokenizer.train(real_texts, vocab_size=800, progress=False, backend="python")
    assert fast.merges == slow.merges and fast.fingerprint() == slow.fingerprint()


def test_other_patterns_are_split_by_regex(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled split only knows SPLIT_PATTERN and GPT4_SPLIT_PATTERN")
    monkeypatch.setattr(bpe, "compiled_chunk_counts", refuse)
    assert count_chunks(["ab  cd ab"], r"\S+|\s+") == {b"ab": 2, b"  ": 1, b"cd": 1, b" ": 1}


def test_bad_inputs_to_the_op_are_clear_errors():
    text, offsets = torch.tensor([104, 105], dtype=torch.uint8), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="all 0x110000 code points"):
        torch.ops.minilm.bpe_count_chunks(text, offsets, torch.zeros(10, dtype=torch.uint8), 1)
    with pytest.raises(RuntimeError, match="within text"):
        torch.ops.minilm.bpe_count_chunks(text, torch.tensor([0, 3]), bpe.unicode_classes(), 1)
    with pytest.raises(RuntimeError, match="sorted"):
        torch.ops.minilm.bpe_count_chunks(text, torch.tensor([0, 2, 1, 2]), bpe.unicode_classes(), 1)
