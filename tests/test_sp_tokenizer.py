"""Phi-3-mini's tokenizer (minilm/sp_tokenizer.py) against the `tokenizers` library and transformers.

No Phi-3 can be downloaded here, so the tests build a tokenizer of its shape with `tokenizers`: a
BPE trained on the pinned text (ASCII plus a few accented words, so CJK and emoji fall back to
bytes), vocab <unk> <s> </s>, then <0x00>..<0xFF>, then the trained pieces; byte_fallback and
fuse_unk; Phi-3's chat tokens after the vocab in Phi-3's order, rstrip like Phi-3's; Llama's
decoder. It comes in the two spellings `tokenizers` writes for Llama: the legacy normalizer
(Prepend "▁" + Replace, Phi-3-mini's file) and the Metaspace pre-tokenizer (prepend_scheme first).
Then: ids and decoding equal the peers' on hypothesis text, render_chat equals the chat template,
and a tiny random Phi-3 with this tokenizer goes through `minilm import-hf`, `generate` (greedy
tokens equal transformers') and a LoRA SFT stage.

    pytest tests/test_sp_tokenizer.py -q
"""

import itertools
import json

import pytest
import torch

pytest.importorskip("transformers", reason="test-only extra transformers not installed")
pytest.importorskip("tokenizers", reason="test-only extra tokenizers not installed")
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

from data_prep.pinned import pinned_documents
from minilm import MinilmError
from minilm.chat_cli import decode_stream
from minilm.checkpoint import load_checkpoint
from minilm.cli import main as cli
from minilm.config import build
from minilm.generate import generate
from minilm.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from minilm.post.chat import render_chat, render_prompt
from minilm.post.preferences import step_end_ids
from minilm.sp_tokenizer import WHITESPACE, SentencePieceTokenizer
from minilm.stages.sft import SFTConfig, run_sft
from minilm.tokenizer import TokenizerError

pytestmark = pytest.mark.lesson_01

# Phi-3-mini's added tokens after its 32,000 pieces (ids 32000..32010), in its order
PHI3_CHAT = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
SPECIALS = ("<s>", "<unk>", *PHI3_CHAT)
# words, spaces (leading, trailing, runs, the ideographic one), newlines, tabs, accents, CJK, emoji,
# control characters Python calls spaces and Rust does not, the "▁" itself, and the special tokens
TEXT = st.lists(st.one_of(st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
                          st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\u3000", "\x1c", "▁",
                                           "the", " the", "Hello", "café", "naïve", "日本", "🙂", "12 + 7",
                                           *SPECIALS])), max_size=10).map("".join)
LEGACY, METASPACE = "legacy", "metaspace"


def build_phi3_shaped(form: str) -> Tokenizer:
    """A `tokenizers` Tokenizer of Phi-3-mini's shape (module docstring), trained on pinned text."""
    texts = [d.text for d in itertools.islice(pinned_documents(), 30)] + ["café naïve résumé über déjà vu"] * 5
    texts = [" ".join(t.split()) for t in texts]   # no newline or tab piece: they fall back to bytes, as in Llama's
    trainer_tok = Tokenizer(models.BPE())
    # SentencePiece pieces never hold a space inside: train on words ("▁the"), then drop the split
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if form == LEGACY:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("</s>", special=False, normalized=False, rstrip=True)])   # as Phi-3's
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
                            for t in PHI3_CHAT])
    return tok


def write_folder(tok: Tokenizer, form: str, folder):
    """tokenizer.json + a tokenizer_config.json under which transformers runs that very file:
    PreTrainedTokenizerFast for the legacy file; LlamaTokenizer (legacy false, what Phi-3's config
    says) for the Metaspace one, since transformers 5's LlamaTokenizer rebuilds a Metaspace-first
    pre-tokenizer whatever the file holds."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cls = "PreTrainedTokenizerFast" if form == LEGACY else "LlamaTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": cls, "legacy": False, "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False}))
    return folder


@pytest.fixture(scope="module", params=[LEGACY, METASPACE])
def peers(request, tmp_path_factory):
    """(ours, the `tokenizers` peer, the peer with encode_special_tokens, AutoTokenizer, form)."""
    folder = write_folder(build_phi3_shaped(request.param), request.param, tmp_path_factory.mktemp(request.param))
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.encode_special_tokens = True   # special-token strings are text, as minilm's default
    return (SentencePieceTokenizer.load(folder), Tokenizer.from_file(str(folder / "tokenizer.json")), plain,
            AutoTokenizer.from_pretrained(folder), request.param)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_ids_and_decoding_equal_the_tokenizers_library(peers, text):
    ours, peer, plain, _, _ = peers
    ids = ours.encode(text, allowed_special="all")
    assert ids == peer.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == peer.decode(ids, skip_special_tokens=False)   # the same round trip
    assume("</s>" not in text)   # the peer splits its non-special </s> out even from plain text
    assert ours.encode(text) == plain.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_autotokenizer_from_the_folder_gives_the_same_ids(peers, text):
    ours, _, _, auto, _ = peers
    ids = ours.encode(text, allowed_special="all")
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert auto.decode(ids) == ours.decode(ids)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_ids_decode_as_the_tokenizers_library_decodes_them(peers, data):
    """Random ids: byte tokens that are not UTF-8 (one U+FFFD per byte), specials, the leading strip."""
    ours, peer, _, _, _ = peers
    byte_tokens = st.integers(3, 258)   # <0x00>..<0xFF>
    ids = data.draw(st.lists(st.one_of(st.integers(0, ours.n_vocab - 1), byte_tokens), max_size=12))
    text = ours.decode(ids)
    assert text == peer.decode(ids, skip_special_tokens=False)
    if "\ufffd" not in text:   # a byte run that is not UTF-8 becomes U+FFFD as a whole, maybe after
        assert "".join(decode_stream(ours, ids)) == text   # its valid first byte was streamed


def test_byte_fallback_fires_for_characters_missing_from_the_vocabulary(peers):
    ours, peer, _, _, _ = peers
    ids = ours.encode("日本🙂 café")
    # the "▁" put in front, then 日 and 本 as their UTF-8 bytes (E6 97 A5, E6 9C AC)
    assert [ours.pieces[i] for i in ids[:7]] == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>"]
    assert "é" in ours.vocab and ours.decode(ids) == "日本🙂 café" == peer.decode(ids)
    assert ours.encode("</s>") != [2] and ours.encode("</s>", allowed_special="all") == [2]
    assert ours.byte_ids[10] in step_end_ids(ours) and ours.special_id("<|end|>") in step_end_ids(ours)


def test_merges_go_by_rank_then_leftmost_as_in_the_tokenizers_library(tmp_path):
    """By hand: "abc" with bc ranked before ab merges b+c first, then a+bc (rank 2); "aaaa" with
    only a+a merges the two leftmost pairs, never the middle one; "d" is not a piece: its byte."""
    vocab = {"<unk>": 0} | {f"<0x{b:02X}>": 1 + b for b in range(256)}
    for piece in ("a", "b", "c", "bc", "ab", "abc", "aa", "<|endoftext|>"):
        vocab[piece] = len(vocab)
    peer = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("a", "bc"), ("a", "a")],
                                unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    peer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    peer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    peer.save(str(tmp_path / "tokenizer.json"))
    ours = SentencePieceTokenizer.load(tmp_path)
    for text, pieces in (("abc", ["abc"]), ("aaaa", ["aa", "aa"]), ("aaa", ["aa", "a"]), ("abd", ["ab", "<0x64>"])):
        assert [ours.pieces[i] for i in ours.encode(text)] == pieces == peer.encode(text).tokens


def test_what_minilm_cannot_read_is_one_clear_error(tmp_path):
    spec = json.loads(build_phi3_shaped(LEGACY).to_str())
    for breaks, says in ((lambda s: s["model"]["vocab"].pop("<0x41>"), "'<0x41>' is missing"),
                         (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
                         (lambda s: s.update(added_tokens=[]), "<|endoftext|>"),
                         (lambda s: s["model"].update(byte_fallback=False), "byte_fallback False")):
        broken = json.loads(json.dumps(spec))
        breaks(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(TokenizerError, match=says):
            SentencePieceTokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokens"):
        SentencePieceTokenizer(spec).encode("x", allowed_special=["<|nope|>"])


CONTENT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>|"), max_size=30)


@settings(max_examples=60, deadline=None)
@given(question=CONTENT, answer=CONTENT)
def test_render_chat_equals_the_exported_chat_template_and_learns_the_answer(peers, tmp_path_factory, question,
                                                                            answer):
    """The text between two tags is one piece: Phi-3's tags swallow the "\\n" and any leading
    whitespace; the mask covers exactly the answer's tokens and its <|end|>."""
    ours, _, _, _, form = peers
    folder = tmp_path_factory.getbasetemp() / f"export-{form}"
    if not (folder / "tokenizer_config.json").exists():
        save_hf_tokenizer(ours, folder)
    auto = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, mask = render_chat(ours, chat)
    assert ids == list(auto.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    prompt = render_prompt(ours, chat[:1])
    assert prompt == list(auto.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
    assert ids[:len(prompt)] == prompt    # a prompt is token for token the prefix of its training chat
    learned = ours.decode([t for t, m in zip(ids, mask) if m])
    assert learned in (answer.lstrip(WHITESPACE) + "<|end|>", " " + answer.lstrip(WHITESPACE) + "<|end|>")


# ---- a tiny random Phi-3 with this tokenizer, through the command line ----

@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    """A Hugging Face Phi-3 folder as a download would be: random tiny weights, the vocab padded
    to a multiple of 64 as Phi-3-mini's 32064 rows pad its 32011 ids, Phi-3's tokenizer files."""
    folder = write_folder(build_phi3_shaped(LEGACY), LEGACY, tmp_path_factory.mktemp("phi3") / "hf")
    n_vocab = SentencePieceTokenizer.load(folder).n_vocab
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=-(-n_vocab // 64) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    Phi3ForCausalLM(config).eval().save_pretrained(folder)
    return folder


@torch.no_grad()
def test_import_hf_then_generate_gives_transformers_greedy_tokens(phi3_folder, capsys):
    ckpt = phi3_folder.parent / "ckpt"
    assert cli(["import-hf", str(phi3_folder), str(ckpt)]) in (None, 0)
    recorded = json.loads((ckpt / "config.json").read_text())["tokenizer"]
    ck = load_checkpoint(ckpt)
    tok = ck.tokenizer
    assert recorded["kind"] == "sentencepiece-bpe" == tok.kind and tok.fingerprint() == recorded["fingerprint"]
    assert ck.model.tokenizer_vocab == tok.n_vocab < ck.config.vocab_size   # padding ids never sampled
    hf = Phi3ForCausalLM.from_pretrained(phi3_folder).eval()
    peer = Tokenizer.from_file(str(phi3_folder / "tokenizer.json"))
    capsys.readouterr()
    for prompt in ("The whale", "  naïve 日本 café", "12 + 7 ="):
        ids = peer.encode(prompt, add_special_tokens=False).ids
        assert ids == tok.encode(prompt)
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=tok.eot_id,
                             suppress_tokens=list(range(tok.n_vocab, hf.config.vocab_size)))[0, len(ids):].tolist()
        ours = generate(ck.model, [ids], max_new_tokens=16, temperature=0, stop_tokens=[tok.eot_id]).responses()[0]
        assert ours == theirs and len(ours) > 5
        assert cli(["generate", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16"]) in (None, 0)
        text = peer.decode(ids + [t for t in theirs if t != tok.eot_id], skip_special_tokens=False)
        expected = prompt + text[len(peer.decode(ids, skip_special_tokens=False)):]
        assert capsys.readouterr().out == f"{expected}\n\n"


def test_export_hf_writes_the_tokenizer_back(phi3_folder, tmp_path):
    ckpt = phi3_folder.parent / "ckpt"
    if not ckpt.exists():
        assert cli(["import-hf", str(phi3_folder), str(ckpt)]) in (None, 0)
    assert cli(["export-hf", str(ckpt), str(tmp_path / "hf")]) in (None, 0)
    original = json.loads((phi3_folder / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text()) == original
    back = load_hf_tokenizer(tmp_path / "hf")
    assert back.fingerprint() == load_checkpoint(ckpt).tokenizer.fingerprint()
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n  café 日本"
    assert auto(text, add_special_tokens=False)["input_ids"] == back.encode(text, allowed_special="all")


def test_a_checkpoint_names_its_tokenizer_kind(phi3_folder, tmp_path):
    ckpt = phi3_folder.parent / "ckpt"
    if not ckpt.exists():
        assert cli(["import-hf", str(phi3_folder), str(ckpt)]) in (None, 0)
    config = json.loads((ckpt / "config.json").read_text())
    config["tokenizer"]["kind"] = "wordpiece"
    (tmp_path / "odd").mkdir()
    for f in ckpt.iterdir():
        (tmp_path / "odd" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "odd" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinilmError, match="tokenizer kind 'wordpiece'"):
        load_checkpoint(tmp_path / "odd")


def test_a_lora_sft_stage_runs_on_the_imported_model(phi3_folder, tmp_path):
    ckpt = phi3_folder.parent / "ckpt"
    if not ckpt.exists():
        assert cli(["import-hf", str(phi3_folder), str(ckpt)]) in (None, 0)
    base = load_checkpoint(ckpt)
    cfg = build(SFTConfig, init=str(ckpt), out_dir=str(tmp_path / "sft"), max_steps=3, batch_size=4, n_train=40,
                n_eval=4, max_len=160, max_new_tokens=8, eval_every=3, ckpt_every=3, log_every=1, device="cpu",
                lora_r=4, text_mix=0.0)
    result = run_sft(cfg)
    assert set(result["after"]) >= {"end_rate", "form_rate", "correct_rate", "reward"}
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    out = load_checkpoint(tmp_path / "sft" / "checkpoint")
    assert out.tokenizer.kind == "sentencepiece-bpe" and out.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    params = dict(out.model.named_parameters())
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)          # the adapters learned
    for name, p in base.model.named_parameters():                                       # the base did not move
        assert torch.equal(p, params[name]), name
