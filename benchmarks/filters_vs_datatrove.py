"""Gopher's quality and repetition filters: minilm's (data_prep/filters.py) against datatrove's, side by side.

    pip install -e ".[bench]"            # the peer: datatrove (and spaCy, its English word splitter)
    python benchmarks/filters_vs_datatrove.py                # the pinned corpus, 5 alternating rounds
    python benchmarks/filters_vs_datatrove.py --sources pinned man doc --repeats 3

Both sides read the same normalised documents (the pipeline's step 2) in one process, one core
each, and decide keep or drop for every document with their full Gopher rule set (Rae et al. 2021,
arXiv 2112.11446, appendix A): datatrove's GopherQualityFilter then GopherRepetitionFilter, each
returning at the first failing rule, against minilm's `drop_reason` (the same rules plus our two
boilerplate rules, also first failure wins). Throughput is MB of text per second over the corpus;
the rounds alternate so both sides see the same machine load, and the table gives min and median.

The two do not split words the same way (datatrove: spaCy's tokenizer; minilm: `str.split`) and
read some thresholds differently (lesson 05), so the table also reports how often they agree on
keep versus drop, and how many documents each keeps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from data_prep.filters import FilterConfig, drop_reason
from data_prep.pipeline import normalise
from data_prep.sources import iter_documents


def peer():
    """datatrove's two Gopher filters as one `text -> keep?` function, or an error naming the install."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    except ImportError as e:
        print(f"error: this benchmark's peer is datatrove ({e}); install it with pip install -e \".[bench]\"",
              file=sys.stderr)
        sys.exit(2)
    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()

    def keep(text: str) -> bool:
        doc = Document(text=text, id="0")
        return _kept(quality.filter(doc)) and _kept(repetition.filter(doc))
    return keep


def _kept(verdict) -> bool:
    return verdict[0] if isinstance(verdict, tuple) else bool(verdict)   # (False, reason) or a bool


def timed(fn, texts: list[str]) -> tuple[float, list[bool]]:
    t0 = time.perf_counter()
    kept = [fn(t) for t in texts]
    return time.perf_counter() - t0, kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", nargs="+", default=["pinned"], help="data_prep.sources names")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (>= 3)")
    args = p.parse_args()

    texts = [normalise(d.text) for d in iter_documents(args.sources)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    cfg = FilterConfig()
    sides = {"datatrove": peer(), "minilm": lambda text: drop_reason(text, cfg) is None}
    sides["datatrove"](texts[0])   # warm-up: datatrove loads spaCy's tokenizer on first use
    print(f"{len(texts):,} documents, {mb:.1f} MB ({', '.join(args.sources)}); one core each; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    kept: dict[str, list[bool]] = {}
    for _ in range(max(args.repeats, 3)):
        for name, fn in sides.items():
            s, kept[name] = timed(fn, texts)
            seconds[name].append(s)
    print(f"{'side':10s} {'MB/s min / median':>18s} {'kept':>7s}")
    for name in sides:
        best, median = mb / min(seconds[name]), mb / statistics.median(seconds[name])
        print(f"{name:10s} {best:8.2f} / {median:7.2f} {sum(kept[name]):7,d}")
    ratio = min(seconds["datatrove"]) / min(seconds["minilm"])
    median_ratio = statistics.median(seconds["datatrove"]) / statistics.median(seconds["minilm"])
    agree = sum(a == b for a, b in zip(kept["minilm"], kept["datatrove"])) / len(texts)
    print(f"minilm is {ratio:.2f}x datatrove (min over min), {median_ratio:.2f}x (median); "
          f"the two agree on keep/drop for {agree:.1%} of the documents")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
