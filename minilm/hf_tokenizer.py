"""minilm's tokenizer as a Hugging Face `tokenizer.json`, and back (lesson 02).

    from minilm.hf_tokenizer import save_hf_tokenizer, load_hf_tokenizer
    save_hf_tokenizer(tok, "runs/tiny-hf")          # tokenizer.json + tokenizer_config.json
    AutoTokenizer.from_pretrained("runs/tiny-hf")   # the same ids as tok.encode, chat template included
    tok = load_hf_tokenizer("runs/tiny-hf")         # what `minilm import-hf` reads (Phi-3-mini's too)

The vocabulary is the same byte-level BPE in two spellings. tiktoken keeps ranks: bytes -> id, and
merges the adjacent pair whose concatenation has the lowest rank. The `tokenizers` library keeps a
vocab of strings and an ordered list of merges, and its ByteLevel pre-tokenizer spells each byte
as one printable character (GPT-2's table, `byte_chars`). The two agree when every pair (a, b)
whose concatenation is a token is a merge, ordered by the rank of a + b: then both pick the same
pair at every step. Text is first cut by the same split regex (a `Split` pre-tokenizer), and the
special tokens are "added tokens", matched before any of it, as tiktoken does with allowed_special.

`tokenizer_config.json` carries Phi-3's chat template, which renders a conversation to exactly the
ids of minilm.post.chat.render_chat. The `tokenizers` library is an optional dependency
(`pip install -e ".[hf]"`, which `transformers` brings too). A tokenizer.json with byte fallback
(Phi-3-mini's SentencePiece-style BPE) is read by minilm/sp_tokenizer.py instead and written back as
it came, without `tokenizers`; its tokenizer_config.json says PreTrainedTokenizerFast so that
`transformers` uses that file as it is (its LlamaTokenizer class would rebuild the normalizer).
"""

from __future__ import annotations

import json
from pathlib import Path

from minilm import MinilmError
from minilm.sp_tokenizer import SentencePieceTokenizer
from minilm.tokenizer import Tokenizer

# Phi-3's template: "<|role|>\nCONTENT<|end|>\n" per message, then "<|assistant|>\n" to answer
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] "
                 "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, soft hyphen, ...) get the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _spell(token: bytes, chars: dict[int, str]) -> str:
    return "".join(chars[b] for b in token)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (a, b) with a, b and a + b all tokens, ordered by rank(a + b), then by rank(a), rank(b)."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], a, b))
    return [(a, b) for *_, a, b in sorted(merges)]


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise MinilmError("writing or reading a Hugging Face tokenizer needs the `tokenizers` library: "
                          "pip install -e \".[hf]\"") from e
    return tokenizers


def hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that gives `tok.encode(text, allowed_special="all")`'s ids."""
    tk = _tokenizers()
    chars = byte_chars()
    vocab = {_spell(t, chars): i for t, i in tok.ranks.items()}
    merges = [(_spell(a, chars), _spell(b, chars)) for a, b in merges_from_ranks(tok.ranks)]
    out = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    out.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(tok.pattern), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.decoder = tk.decoders.ByteLevel()
    out.add_special_tokens([tk.AddedToken(s, special=True, normalized=False)
                            for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    for s, i in tok.special_tokens.items():
        if out.token_to_id(s) != i:
            raise MinilmError(f"special token {s} would get id {out.token_to_id(s)} in the Hugging Face "
                              f"tokenizer, not {i}: its special ids must follow the vocabulary without gaps")
    return out


def save_hf_tokenizer(tok, out_dir, max_length: int | None = None) -> Path:
    """Write tokenizer.json and tokenizer_config.json (chat template, end and padding tokens) for a
    Tokenizer or a SentencePieceTokenizer (whose tokenizer.json goes back unchanged)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok.kind == SentencePieceTokenizer.kind:
        tok.save(out_dir)
        names = {}
    else:
        hf_tokenizer(tok).save(str(out_dir / "tokenizer.json"))
        names = {"minilm_name": tok.name, "minilm_pattern": tok.pattern}
    chat = "<|end|>" in tok.special_tokens and "<|assistant|>" in tok.special_tokens
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "model_max_length": max_length or 1 << 30, **names,
              **({"chat_template": CHAT_TEMPLATE} if chat else {})}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out_dir


def load_hf_tokenizer(hf_dir) -> Tokenizer | SentencePieceTokenizer:
    """minilm's Tokenizer from a byte-level BPE tokenizer.json (one this module wrote, or alike), or a
    SentencePieceTokenizer from a BPE with byte fallback (Phi-3-mini's, Llama-2's)."""
    path = Path(hf_dir) / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model, added = spec["model"], spec.get("added_tokens", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MinilmError(f"cannot read a Hugging Face tokenizer from {path} ({e})") from e
    if model.get("type") != "BPE":
        raise MinilmError(f"{path} holds a {model.get('type')} model; minilm reads BPE only (byte-level, or "
                          f"SentencePiece-style with byte fallback)")
    if model.get("byte_fallback"):
        return SentencePieceTokenizer(spec, path)
    config_path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    pattern = config.get("minilm_pattern") or _split_pattern(spec)
    unchar = {c: b for b, c in byte_chars().items()}
    try:
        ranks = {bytes(unchar[c] for c in token): i for token, i in model["vocab"].items()}
    except KeyError as e:
        raise MinilmError(f"{path}: token spelled with {e} is not byte-level BPE (GPT-2's byte table)") from e
    specials = {a["content"]: a["id"] for a in added if a.get("special")}
    return Tokenizer(config.get("minilm_name", Path(hf_dir).name), pattern, ranks, specials)


def _split_pattern(spec: dict) -> str:
    """The regex of the first Split pre-tokenizer (minilm writes its split pattern there)."""
    pre = spec.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p["pattern"]["Regex"]
    raise MinilmError("the tokenizer.json has no Split pre-tokenizer with a regex; minilm needs its split pattern")
