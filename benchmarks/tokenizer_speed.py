"""Tokenizer speed: BPE training (compiled: split and merge loop in C++; pure Python: the regex split
and the Python merge loop; rustbpe and HF tokenizers when installed), and tiktoken vs the pure-Python
reference encoder.

    python benchmarks/tokenizer_speed.py                    # 4096-token vocab on ~10 MB of text
    python benchmarks/tokenizer_speed.py --mb 2 --vocab 1024

The text is the Python standard library's own source files (no download, ~20 MB available). The
first --mb MB train the tokenizer; the next --heldout-mb MB are held out to measure compression
(bytes per token) on text the merges never saw. Everything is measured in the same run, so the
ratios compare like with like on this machine; each trainer runs --repeats times and the min and median
are printed with the load average, since a busy machine slows some runs. See lessons/02_tokenizer.md.
"""

import argparse
import functools
import os
import statistics
import time

from data_prep.stdlib_docs import stdlib_dir
from minilm.ops._kernels import LOAD_ERROR, LOADED
from minilm.ops.bpe import compiled_merges, unicode_classes
from minilm.bpe_train import SPLIT_PATTERN, count_chunks, learn_merges, reference_encode
from minilm.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

# Third-party packages are not the stdlib; leaving them out keeps the corpus the same everywhere.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source() -> list[str]:
    """Every stdlib .py file (~30 MB) in sorted path order, so every run sees the same text."""
    root, texts = stdlib_dir(), []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
    return texts


def split_at(texts: list[str], n_chars: int) -> tuple[list[str], list[str]]:
    """First files up to `n_chars` characters, and the rest."""
    total = 0
    for i, text in enumerate(texts):
        total += len(text)
        if total >= n_chars:
            return texts[:i + 1], texts[i + 1:]
    return texts, []


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bytes_per_token(tok: Tokenizer, texts: list[str]) -> float:
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens


def fmt(times: list[float]) -> str:
    """'min / median s' of repeated timings."""
    return f"{min(times):.2f} / {statistics.median(times):.2f} s"


def ranks_of(merges) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks[a + b] = len(ranks)
    return ranks


def peers(texts: list[str], vocab: int):
    """(name, train() -> ranks) for the installed peers, with minilm's split pattern and no specials."""
    try:
        import rustbpe

        def train_rustbpe():
            tok = rustbpe.Tokenizer()
            tok.train_from_iterator(iter(texts), vocab, pattern=SPLIT_PATTERN)
            return dict(tok.get_mergeable_ranks())
        yield "rustbpe", train_rustbpe
    except ImportError:
        print("train   rustbpe: not installed (pip install rustbpe), skipped")
    try:
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

        def train_hf():
            tok = HFTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.train_from_iterator(texts, trainers.BpeTrainer(
                vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
            return tok.get_vocab()   # byte-level strings, not bytes: compared by time only
        yield "HF tokenizers", train_hf
    except ImportError:
        print("train   HF tokenizers: not installed, skipped")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=10.0, help="MB (millions of chars) to train on")
    p.add_argument("--vocab", type=int, default=4096, help="total vocab size incl. specials")
    p.add_argument("--heldout-mb", type=float, default=1.0, help="held-out text for compression")
    p.add_argument("--ref-mb", type=float, default=0.5, help="text for the slow reference encoder")
    p.add_argument("--repeats", type=int, default=3, help="training runs of each trainer (min and median)")
    args = p.parse_args()

    train, rest = split_at(stdlib_source(), int(args.mb * 1e6))
    held, _ = split_at(rest, int(args.heldout_mb * 1e6))
    n_train = sum(map(len, train))
    print(f"corpus: {len(train)} stdlib files, {n_train / 1e6:.2f} M chars for training, "
          f"{sum(map(len, held)) / 1e6:.2f} M held out; {os.cpu_count()} CPU cores")

    # 1. Training: each way `repeats` times, each phase timed; then the peers on the same text and vocab.
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min); times are the min / "
          f"median of {args.repeats} runs")
    _, t_table = timed(unicode_classes)
    print(f"train   class table from regex (once per process, in the first compiled run): {t_table:.2f} s")
    unicode_classes.cache_clear()
    n_merges = args.vocab - 256 - len(SPECIAL_TOKENS)
    runs = {}   # backend -> (chunks, merges, count times, merge times)
    for backend in ("compiled", "python") if LOADED else ("python",):
        t_counts, t_merges = [], []
        for _ in range(args.repeats):
            chunks, t_count = timed(functools.partial(count_chunks, train, backend="auto" if backend == "compiled"
                                                      else "python"))
            merges, t_merge = timed(functools.partial(compiled_merges, chunks, n_merges) if backend == "compiled"
                                    else functools.partial(learn_merges, chunks, n_merges, progress=True))
            t_counts.append(t_count)
            t_merges.append(t_merge)
        runs[backend] = chunks, merges, t_counts, t_merges
        print(f"train   {backend:<9} count chunks {fmt(t_counts)}, merges {fmt(t_merges)}, "
              f"total {fmt([c + m for c, m in zip(t_counts, t_merges)])}")
    chunks, merges, *_ = runs["python"]
    for other, other_merges, *_ in runs.values():
        assert list(other.items()) == list(chunks.items()), "the compiled split's counts differ from regex's"
        assert other_merges == merges, "the compiled trainer's merges differ from the reference's"
    totals = {backend: min(c + m for c, m in zip(*run[2:])) for backend, run in runs.items()}
    t_ours = totals["compiled"] if LOADED else totals["python"]
    print(f"train   {len(chunks):,} distinct chunks; identical counts and merges; "
          + (f"compiled total {totals['python'] / t_ours:.1f}x the pure Python one, " if LOADED else
             f"minilm._C is not built ({LOAD_ERROR}), so only Python ran, ") + f"{n_train / t_ours / 1e6:.1f} M chars/s")
    ours = "minilm compiled" if LOADED else "minilm (Python)"
    for name, peer in peers(train, args.vocab - len(SPECIAL_TOKENS)):
        times = []
        for _ in range(args.repeats):
            ranks, t_peer = timed(peer)
            times.append(t_peer)
        same = "identical ranks" if ranks == ranks_of(merges) else "other merges (another pre-tokenizer)"
        print(f"train   {name}: total {fmt(times)}; {ours} is {min(times) / t_ours:.2f}x its speed "
              f"(min over min); {same}")
    print(f"train   load average after training {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    tok = Tokenizer.train(train, args.vocab, progress=False)

    # 2. Encoding: the reference on a sample (it is slow), tiktoken on all the training text.
    sample, _ = split_at(train, int(args.ref_mb * 1e6))
    ref_ids, t_ref = timed(lambda: [reference_encode(t, tok.merges, tok.pattern) for t in sample])
    assert ref_ids == [tok.encode(t) for t in sample], "tiktoken and the reference BPE disagree"
    ref_speed = sum(map(len, sample)) / t_ref
    _, t_one = timed(lambda: [tok.encode(t) for t in train])
    _, t_batch = timed(lambda: tok.encode_batch(train))
    print(f"encode  reference (pure Python): {ref_speed / 1e6:7.3f} M chars/s")
    for label, seconds in (("tiktoken encode, 1 thread:", t_one),
                           ("tiktoken encode_batch:", t_batch)):
        speed = n_train / seconds
        print(f"encode  {label:<26}{speed / 1e6:7.3f} M chars/s "
              f"({speed / ref_speed:.0f}x the reference)")

    # 3. Compression on held-out text, with cl100k_base (100k vocab) for scale when installed.
    if held:
        print(f"compress {tok.name}: {bytes_per_token(tok, held):.2f} bytes/token on held-out text "
              f"({bytes_per_token(tok, train):.2f} on training text)")
        try:
            big = Tokenizer.from_tiktoken("cl100k_base")
            print(f"compress {big.name}: {bytes_per_token(big, held):.2f} bytes/token on held-out")
        except TokenizerError as e:
            print(f"compress cl100k_base: skipped ({e})")


if __name__ == "__main__":
    main()
