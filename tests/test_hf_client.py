"""An exported checkpoint used as a real Hugging Face client would use it (minilm/hf_tokenizer.py).

`minilm export-hf` writes weights, config, tokenizer.json and tokenizer_config.json. Then
AutoTokenizer gives minilm's ids on any text (hypothesis draws it), its chat template gives
render_chat's ids, AutoModelForCausalLM + generate and pipeline("text-generation") give
`minilm generate`'s greedy tokens, and `minilm import-hf` reads the tokenizer back unchanged.

    pytest -m lesson_02 tests/test_hf_client.py -q
"""

import itertools
import json

import pytest
import torch

pytest.importorskip("transformers", reason="test-only extra transformers not installed")
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from data_prep.pinned import pinned_documents
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint, save_checkpoint
from minilm.cli import main as cli
from minilm.config import ModelConfig
from minilm.generate import generate
from minilm.hf_tokenizer import byte_chars, hf_tokenizer, load_hf_tokenizer, merges_from_ranks
from minilm.model import Phi3
from minilm.post.chat import render_chat, render_prompt
from minilm.tokenizer import SPECIAL_TOKENS, Tokenizer

pytestmark = pytest.mark.lesson_02

# letters, digits, spaces, newlines, punctuation, accents, CJK, emoji and the special tokens
TEXT = st.lists(st.one_of(st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
                          st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "'s", "'LL", "123", " 4.5", "é", "日本",
                                           "🙂", *SPECIAL_TOKENS])), max_size=12).map("".join)


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in itertools.islice(pinned_documents(), 40)]
    return Tokenizer.train(texts, vocab_size=700, progress=False)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = Phi3(ModelConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                             max_seq_len=96, tie_embeddings=True)).eval()
    root = tmp_path_factory.mktemp("client")
    save_checkpoint(root / "ckpt", model, tok)
    assert cli(["export-hf", str(root / "ckpt"), str(root / "hf")]) in (None, 0)
    return model, root


def test_gpt2_byte_table_and_merges_by_hand():
    chars = byte_chars()
    assert len(set(chars.values())) == 256 and chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[10] == "Ċ"
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b"bc": 258}
    # abc splits as ab+c and a+bc: both are merges, ordered by the merged token's rank (257), then
    # by the first piece's rank (a = 97 before ab = 256); bc (258) comes last
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"a", b"bc"), (b"ab", b"c"), (b"b", b"c")]


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_the_tokenizers_library_gives_minilms_ids(tok, text):
    assert hf_tokenizer(tok).encode(text).ids == tok.encode(text, allowed_special="all")


@settings(max_examples=60, deadline=None)
@given(text=TEXT, question=st.text(max_size=30), answer=st.text(max_size=30))
def test_autotokenizer_and_its_chat_template_give_minilms_ids(exported, tok, text, question, answer):
    _, root = exported
    auto = _auto(root)
    assert auto(text, add_special_tokens=True)["input_ids"] == tok.encode(text, allowed_special="all")
    assert auto.decode(tok.encode(text, allowed_special="all")) == text
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert _ids(auto.apply_chat_template(chat, tokenize=True)) == render_chat(tok, chat)[0]
    assert _ids(auto.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True)) == \
        render_prompt(tok, chat[:1])


@torch.no_grad()
def test_transformers_generate_and_pipeline_equal_minilm_greedy(exported, tok):
    model, root = exported
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    prompts = ["The whale", "Alice was beginning", "12 + 7 ="]
    stops = [tok.special_id("<|end|>"), tok.eot_id]
    for text in prompts:
        ids = tok.encode(text)
        ours = generate(model, [ids], max_new_tokens=20, temperature=0, stop_tokens=stops).responses()[0]
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)[0, len(ids):].tolist()
        assert theirs == ours
        assert len(ours) > 5          # a random model rarely stops at once: the comparison has substance
    out = pipeline("text-generation", model=str(root / "hf"), tokenizer=str(root / "hf"))(
        prompts[0], max_new_tokens=20, do_sample=False, return_full_text=False)
    ids = tok.encode(prompts[0])
    expected = generate(model, [ids], max_new_tokens=20, temperature=0, stop_tokens=stops).responses()[0]
    assert out[0]["generated_text"] == tok.decode([t for t in expected if t not in stops])


def test_import_hf_reads_the_tokenizer_back(exported, tok):
    model, root = exported
    assert cli(["import-hf", str(root / "hf"), str(root / "back")]) in (None, 0)
    back = load_checkpoint(root / "back")
    assert back.tokenizer.ranks == tok.ranks and back.tokenizer.special_tokens == tok.special_tokens
    assert back.tokenizer.pattern == tok.pattern and back.tokenizer.fingerprint() == tok.fingerprint()
    for p, q in zip(back.model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_a_tokenizer_json_that_is_not_byte_level_bpe_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(MinilmError, match="minilm reads BPE only"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(MinilmError, match="cannot read a Hugging Face tokenizer"):
        load_hf_tokenizer(tmp_path)


def _auto(root):
    return AutoTokenizer.from_pretrained(root / "hf")


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list in transformers 4 and a BatchEncoding in 5."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_import_hf_of_a_tokenizer_it_cannot_read_keeps_the_model_and_says_why(exported, tmp_path, capsys):
    """A byte-fallback BPE is Phi-3-mini's kind (tests/test_sp_tokenizer.py imports one), but this one
    lacks the byte tokens <0x00>..<0xFF>: the weights import, the tokenizer is named as unreadable
    with the reason, and the checkpoint is written without one."""
    import shutil
    _, root = exported
    shutil.copytree(root / "hf", tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec))
    assert cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) in (None, 0)
    err = capsys.readouterr().err
    assert "warning" in err and "'<0x00>' is missing" in err and "--tokenizer DIR" in err
    assert load_checkpoint(tmp_path / "back").tokenizer is None
