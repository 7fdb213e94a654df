"""Phi-3-mini's tokenizer: a SentencePiece-style BPE with byte fallback, read from its tokenizer.json.

    from minilm.sp_tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer.load("~/models/Phi-3-mini-4k-instruct")   # the folder's tokenizer.json
    ids = tok.encode("Hello <|user|>", allowed_special="all"); text = tok.decode(ids)

Phi-3-mini uses Llama-2's tokenizer (arXiv 2404.14219, section 2, vocabulary 32064: the embedding's
rows; the tokenizer has Llama-2's 32,000 pieces and Phi-3's added tokens, ids up to 32010). Unlike
minilm's byte-level BPE (minilm/tokenizer.py) it has no split regex, a space is the character "▁"
inside pieces, and its alphabet is characters, not bytes. Encoding, as the `tokenizers` library
does it: 1. added tokens (<|user|>, <|end|>, ...) are cut out first, an `rstrip` one (Phi-3's chat
tokens) swallowing the whitespace after it; 2. each text piece between them is normalized: " " ->
"▁", and a "▁" put in front (the normalizer Prepend + Replace of legacy files, Llama-2's and
Phi-3-mini's; or the Metaspace pre-tokenizer of non-legacy ones, whose prepend_scheme "first" puts
it in front of the text's first piece only); 3. each character is a symbol, one missing from the
vocabulary its UTF-8 bytes, the tokens <0x00>..<0xFF> (byte fallback: no unknown token); 4. adjacent
symbols merge by the merge's rank, lowest first, the leftmost on ties. Decoding: "▁" -> " ", runs of
byte tokens -> UTF-8 (U+FFFD per byte of a run that is not), then one leading space stripped.

Deviations: added tokens the file marks special=false (Phi-3's </s>) count as special here too, so
plain text never produces them; encode never adds <s> (the file's post-processor is not applied,
like `add_special_tokens=False`). Pure Python, ~10x slower than `tokenizers`' Rust
(benchmarks/sp_tokenizer_speed.py).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from pathlib import Path

from minilm.tokenizer import SpecialTokenIds, TokenizerError

# what Rust's char::is_whitespace accepts, which decides what an rstrip/lstrip added token swallows
# (Python's str.isspace also takes \x1c..\x1f)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b))) + "\u2028\u2029\u202f\u205f\u3000"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")   # what the ByteFallback decoder reads as one byte


def _fail(path, what: str) -> TokenizerError:
    return TokenizerError(f"{path}: {what}; minilm reads the SentencePiece-style BPE of Llama-2 / Phi-3-mini "
                          f"as the `tokenizers` library writes it")


def _normalizer_steps(spec, path) -> list[tuple[str, str, str]]:
    """The normalizer as ("prepend", prefix, "") and ("replace", pattern, content) steps, in order."""
    if spec is None:
        return []
    steps = []
    for n in spec["normalizers"] if spec["type"] == "Sequence" else [spec]:
        if n["type"] == "Prepend":
            steps.append(("prepend", n["prepend"], ""))
        elif n["type"] == "Replace" and len(n["pattern"].get("String", "")) == len(n["content"]) == 1:
            steps.append(("replace", n["pattern"]["String"], n["content"]))
        else:   # one character for one keeps offsets simple (encode_chat's mask needs them)
            raise _fail(path, f"normalizer {n} is not supported (Prepend, or Replace of one character)")
    return steps


def _metaspace(spec, path) -> tuple[str, str] | None:
    """(replacement, prepend_scheme) of a Metaspace pre-tokenizer, or None when there is none."""
    if spec is None:
        return None
    if spec["type"] != "Metaspace" or spec.get("split", True):
        raise _fail(path, f"pre_tokenizer {spec} is not supported (none, or Metaspace with split false)")
    scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
    return spec["replacement"], scheme


def _decoder_steps(spec, path) -> list[dict]:
    """The decoder's steps, in order; `decode` runs them over the list of token strings."""
    steps = spec.get("decoders", []) if spec and spec["type"] == "Sequence" else [spec]
    for d in steps:
        if not d or d["type"] not in ("Replace", "ByteFallback", "Fuse", "Strip"):
            raise _fail(path, f"decoder {d} is not supported (a Sequence of Replace, ByteFallback, Fuse, Strip)")
    return steps


def _byte_fallback(tokens: list[str]) -> list[str]:
    """Runs of <0xXX> tokens -> their UTF-8 text, or one U+FFFD per byte when it is not valid."""
    out, run = [], bytearray()
    for t in tokens + [None]:   # None flushes the last run
        if t is not None and BYTE_TOKEN.fullmatch(t):
            run.append(int(t[3:5], 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run = bytearray()
        if t is not None:
            out.append(t)
    return out


def _strip(token: str, char: str, start: int, stop: int) -> str:
    """At most `start` leading and `stop` trailing copies of `char` removed (the Strip decoder)."""
    lead = len(token) - len(token.lstrip(char))
    token = token[min(lead, start):]
    trail = len(token) - len(token.rstrip(char))
    return token[:len(token) - min(trail, stop)]


class SentencePieceTokenizer(SpecialTokenIds):
    """A SentencePiece-style BPE with byte fallback (the `tokenizers` JSON model), in pure Python."""
    kind = "sentencepiece-bpe"   # what a checkpoint's config.json records (minilm.tokenizer.Tokenizer: "byte-bpe")

    def __init__(self, spec: dict, path="tokenizer.json"):
        try:
            self._read(spec, path)
        except TokenizerError:
            raise
        except KeyError as e:
            raise _fail(path, f"{e} is missing (the 256 byte tokens <0x00>..<0xFF> and every merge's "
                              f"pieces must be in the vocab)") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise _fail(path, f"it is malformed ({e!r})") from None
        self.spec = spec
        self.pieces = {i: t for t, i in self.vocab.items()} | {i: t for t, i in self.special_tokens.items()}
        self.n_vocab = max(self.pieces) + 1   # the model's embedding may have more rows (Phi-3-mini: 32064)
        self.name = f"{self.kind}-{self.n_vocab}"
        self._matchers: dict[frozenset, re.Pattern] = {}

    def _read(self, spec: dict, path) -> None:
        model, added = spec["model"], spec.get("added_tokens", [])
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise _fail(path, f"the model is {model.get('type')} with byte_fallback {model.get('byte_fallback')}")
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise _fail(path, "BPE dropout, continuing_subword_prefix and end_of_word_suffix are not supported")
        if any(a.get("normalized") or a.get("single_word") for a in added):
            raise _fail(path, "added tokens with normalized or single_word set are not supported")
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.byte_ids = [self.vocab[t] for t in BYTE_TOKENS]
        self.ignore_merges = model.get("ignore_merges", False)
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]   # "a b" or [a, b]
        # (left id, right id) -> (rank, id of left + right); a merge's rank is its place in the list
        self.merges = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b]) for rank, (a, b) in enumerate(merges)}
        self.steps = _normalizer_steps(spec.get("normalizer"), path)
        self.metaspace = _metaspace(spec.get("pre_tokenizer"), path)
        self.decoder = _decoder_steps(spec.get("decoder"), path)
        self.special_tokens = {a["content"]: a["id"] for a in added}   # every added token (see deviations)
        self.strips = {a["id"]: (a.get("lstrip", False), a.get("rstrip", False)) for a in added}
        if "<|endoftext|>" not in self.special_tokens:
            raise _fail(path, "there is no <|endoftext|> added token (minilm ends documents and pads with it)")

    @classmethod
    def load(cls, directory) -> SentencePieceTokenizer:
        """Read DIRECTORY/tokenizer.json (a downloaded Phi-3 folder, or a checkpoint this class saved)."""
        path = Path(directory) / "tokenizer.json"
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read {path} ({e}); copy the model folder's tokenizer.json again") from None
        if not isinstance(spec, dict):
            raise _fail(path, "it is not a JSON object")
        return cls(spec, path)

    def save(self, directory) -> None:
        """Write tokenizer.json unchanged: the same file `tokenizers` and `transformers` read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(json.dumps(self.spec, ensure_ascii=False, indent=2), encoding="utf-8")

    # ---- encoding ----

    def _split(self, text: str, allowed) -> list[int | str]:
        """Text -> [text, id, text, id, ..., text]: the allowed added tokens cut out, leftmost-longest."""
        allowed = frozenset(self.special_tokens if allowed == "all" else allowed)
        if unknown := allowed - set(self.special_tokens):
            raise TokenizerError(f"allowed_special has unknown tokens {sorted(unknown)}; "
                                 f"this tokenizer's special tokens: {sorted(self.special_tokens)}")
        if not allowed:
            return [text]
        if allowed not in self._matchers:   # longest first: at one position the longest token wins
            self._matchers[allowed] = re.compile("|".join(map(re.escape, sorted(allowed, key=len, reverse=True))))
        parts, pos = [], 0
        for m in self._matchers[allowed].finditer(text):
            parts += [text[pos:m.start()], self.special_tokens[m.group()]]
            pos = m.end()
        return parts + [text[pos:]]

    def _normalize(self, text: str, first: bool) -> tuple[str, int]:
        """(the piece as BPE sees it, how many characters were put in front of it)."""
        front = 0
        for kind, a, b in self.steps:
            if kind == "prepend" and text:   # empty after an earlier step: stays empty
                text, front = a + text, front + len(a)
            elif kind == "replace":
                text = text.replace(a, b)
        if self.metaspace:
            mark, scheme = self.metaspace
            text = text.replace(" ", mark)
            # "first": only the piece that starts the whole text
            if (scheme == "always" or scheme == "first" and first) and not text.startswith(mark):
                text, front = mark + text, front + 1
        return text, front

    def _symbols(self, word: str) -> tuple[list[int], list[int]]:
        """(ids, the character each came from): one per character, its bytes when it is not a token."""
        ids, where = [], []
        for i, ch in enumerate(word):
            got = [self.vocab[ch]] if ch in self.vocab else [self.byte_ids[b] for b in ch.encode("utf-8")]
            ids += got
            where += [i] * len(got)
        return ids, where

    def _merge(self, ids: list[int], where: list[int]) -> tuple[list[int], list[int]]:
        """Merge adjacent symbols, the lowest rank first and the leftmost on ties, until none applies.

        As `tokenizers` does it: a heap of (rank, position) candidates over a linked list of symbols;
        a candidate gone stale (one of its symbols merged since it was pushed) is skipped."""
        n, heap = len(ids), []
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n

        def push(a: int) -> None:   # the pair that starts at symbol a, if it is a merge
            if a >= 0 and nxt[a] < n and (ids[a], ids[nxt[a]]) in self.merges:
                rank, new = self.merges[ids[a], ids[nxt[a]]]
                heapq.heappush(heap, (rank, a, new))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or self.merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue
            ids[i], alive[j], nxt[i] = new, False, nxt[j]   # symbol i becomes the pair; j is gone
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        keep = [i for i in range(n) if alive[i]]
        return [ids[i] for i in keep], [where[i] for i in keep]

    def _encode_parts(self, parts: list[int | str]) -> list[tuple[int, int, int]]:
        """(token id, part index, character of that part it starts at) for every token of `parts`."""
        out = []
        for k, part in enumerate(parts):
            if isinstance(part, int):
                out.append((part, k, 0))
                continue
            before, after = parts[k - 1] if k else None, parts[k + 1] if k + 1 < len(parts) else None
            cut = 0
            if isinstance(before, int) and self.strips[before][1]:   # rstrip: whitespace after it is its own
                cut = len(part) - len(part.lstrip(WHITESPACE))
            if isinstance(after, int) and self.strips[after][0]:     # lstrip: whitespace before it too
                part = part.rstrip(WHITESPACE)
            if not part[cut:]:   # nothing left between two added tokens: no tokens, not even a "▁"
                continue
            word, front = self._normalize(part[cut:], first=k == 0)
            ids, where = ([self.vocab[word]], [0]) if self.ignore_merges and word in self.vocab else \
                self._merge(*self._symbols(word))
            out += [(t, k, cut + max(0, w - front)) for t, w in zip(ids, where)]
        return out

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """Text -> ids. Special-token strings are ordinary text unless listed in allowed_special."""
        return [t for t, _, _ in self._encode_parts(self._split(text, allowed_special))]

    def encode_batch(self, texts, allowed_special=()) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def encode_chat(self, pieces, learn) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a chat as pieces: an int is a special token's id, a str is text.

        The text between two special tokens is encoded as one piece, as `tokenizers` encodes the
        chat's whole text: "\\n" + content after <|user|> is one piece, and an rstrip tag swallows the
        "\\n". Message text never becomes a special token. A token's mask is its first character's."""
        parts, marks = [], []   # marks: per text part, the mask value of each of its characters
        for piece, m in zip(pieces, learn):
            if not isinstance(piece, int) and parts and not isinstance(parts[-1], int):
                parts[-1], marks[-1] = parts[-1] + piece, marks[-1] + [m] * len(piece)
            else:
                parts.append(piece)
                marks.append(m if isinstance(piece, int) else [m] * len(piece))
        tokens = self._encode_parts(parts)
        return [t for t, _, _ in tokens], [marks[k] if isinstance(parts[k], int) else marks[k][c] for _, k, c in tokens]

    # ---- decoding ----

    def decode(self, ids) -> str:
        """Ids (list, numpy array or tensor) -> text, as `tokenizers`' decode(skip_special_tokens=False)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            tokens = [self.pieces[int(i)] for i in ids]
        except (KeyError, ValueError, TypeError) as e:
            raise TokenizerError(f"cannot decode: ids must be ints that exist in {self.name} "
                                 f"(0..{self.n_vocab - 1}); got {e!r}") from None
        for d in self.decoder:
            if d["type"] == "Replace":
                tokens = [t.replace(d["pattern"]["String"], d["content"]) for t in tokens]
            elif d["type"] == "ByteFallback":
                tokens = _byte_fallback(tokens)
            elif d["type"] == "Fuse":
                tokens = ["".join(tokens)]
            else:
                tokens = [_strip(t, d["content"], d["start"], d["stop"]) for t in tokens]
        return "".join(tokens)

    # ---- what the stages read ----

    def fingerprint(self) -> str:
        """Short hash of the whole tokenizer.json; a checkpoint stores it to catch mismatches."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(n_vocab={self.n_vocab})"
