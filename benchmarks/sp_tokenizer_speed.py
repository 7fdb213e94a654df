"""Phi-3-mini's tokenizer in pure Python (minilm/sp_tokenizer.py) against the `tokenizers` library.

    python benchmarks/sp_tokenizer_speed.py                 # a 32,000-piece vocab, as Phi-3-mini's
    python benchmarks/sp_tokenizer_speed.py --vocab 8000

Phi-3-mini's own file cannot be downloaded here, so `tokenizers` trains one of its shape (the one
tests/test_sp_tokenizer.py builds, at full size): BPE pieces learned on 80% of the stdlib
docstrings, <unk> <s> </s> and the 256 byte tokens first, Llama's legacy normalizer and decoder,
Phi-3's chat tokens after the vocab. The other 20% is held out and encoded by both, which must give
identical ids; the script prints the load time, MB/s of each and the ratio. See lessons/01_transformer.md.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from data_prep.stdlib_docs import stdlib_documents
from minilm.sp_tokenizer import SentencePieceTokenizer

CHAT = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")


def phi3_shaped(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-fallback BPE of Phi-3-mini's shape with `vocab_size` pieces, trained on `texts`."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)  # "▁word" pieces
    one_line = [" ".join(t.split()) for t in texts]           # newlines and tabs stay byte tokens
    trainer_tok.train_from_iterator(one_line, trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in CHAT])
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    docs = [text for _, text in stdlib_documents()]
    cut = len(docs) * 4 // 5
    train, held = docs[:cut], docs[cut:]
    peer = phi3_shaped(train, args.vocab)
    folder = Path(tempfile.mkdtemp())
    peer.save(str(folder / "tokenizer.json"))
    start = time.perf_counter()
    ours = SentencePieceTokenizer.load(folder)
    load_s = time.perf_counter() - start
    mb = sum(len(t.encode()) for t in held) / 1e6

    start = time.perf_counter()
    our_ids = [ours.encode(t, allowed_special="all") for t in held]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    peer_ids = [peer.encode(t, add_special_tokens=False).ids for t in held]
    peer_s = time.perf_counter() - start
    assert our_ids == peer_ids, "minilm's ids differ from the tokenizers library's"
    n_tokens = sum(map(len, our_ids))
    print(f"vocab {ours.n_vocab} ids, {len(ours.merges)} merges; loaded in {load_s:.2f} s")
    print(f"held out: {len(held)} docstrings, {mb:.2f} MB, {n_tokens} tokens ({mb * 1e6 / n_tokens:.2f} bytes/token), "
          f"identical ids")
    print(f"minilm SentencePieceTokenizer {mb / ours_s:.3f} MB/s; tokenizers (Rust) {mb / peer_s:.2f} MB/s: "
          f"{ours_s / peer_s:.1f}x faster")


if __name__ == "__main__":
    main()
