"""Throughput of the data pipeline's per-document stages with 1 and with N worker processes.

    python benchmarks/pipeline_throughput.py                      # the pinned corpus, every document
    python benchmarks/pipeline_throughput.py --sources stdlib man doc pypi --limit-per-source 400 --workers 4

Reads the sources once (by default the pinned corpus, the same bytes on every machine), then times the quality filters (`apply_filters`) and the MinHash
signatures (`near_dedup`'s first step) on the same documents, serially and with `parallel_map`,
in one run, and prints MB/s and the speed-up. The results must be identical; the script checks.
Numbers depend on how busy the machine is: run it on idle cores.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from data_prep.dedup import DedupConfig, hash_params, signature
from data_prep.filters import FilterConfig, drop_reason
from data_prep.parallel import default_workers, parallel_map
from data_prep.pipeline import normalise
from data_prep.sources import iter_documents


def timed(fn, texts, workers) -> tuple[list, float]:
    t = time.perf_counter()
    out = parallel_map(fn, texts, workers, progress=False)
    return out, time.perf_counter() - t


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", nargs="+", default=["pinned"])
    p.add_argument("--limit-per-source", type=int, default=0, help="0: every document")
    p.add_argument("--workers", type=int, default=0, help="0: every available CPU")
    a = p.parse_args(argv)
    workers = a.workers or default_workers()
    texts = [normalise(d.text) for d in iter_documents(a.sources, a.limit_per_source or None)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    dcfg = DedupConfig()
    hash_a, hash_b = hash_params(dcfg.num_perm, dcfg.seed)
    stages = {"filters": partial(drop_reason, cfg=FilterConfig()),
              "minhash": partial(signature, ngram=dcfg.ngram, a=hash_a, b=hash_b)}
    print(f"{len(texts)} documents, {mb:.2f} MB; {workers} workers\n")
    print(f"| stage | 1 process MB/s | {workers} workers MB/s | speed-up |\n|---|---:|---:|---:|")
    rows = []
    for name, fn in stages.items():
        serial, t1 = timed(fn, texts, 1)
        parallel, tn = timed(fn, texts, workers)
        same = all((x == y).all() if hasattr(x, "all") else x == y for x, y in zip(serial, parallel))
        if not same:
            raise SystemExit(f"{name}: the parallel results differ from the serial ones")
        rows.append({"stage": name, "mb_per_s_1": mb / t1, "mb_per_s_n": mb / tn, "speedup": t1 / tn})
        print(f"| {name} | {mb / t1:.2f} | {mb / tn:.2f} | {t1 / tn:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
