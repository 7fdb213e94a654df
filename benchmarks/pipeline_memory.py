"""Peak memory and throughput of the streamed data pipeline on 1x, 10x and 100x the pinned corpus.

    python benchmarks/pipeline_memory.py                          # 1x, 10x, 100x (100x: ~1.5 GB of text)
    python benchmarks/pipeline_memory.py --sizes 10 100 --chars 1500   # 10x / 100x the documents, cut short

Copy k of the pinned corpus's 927 documents is written to `corpus-Nx/copy-k.jsonl`: copy 0 is the
text itself, every other copy reverses each word with probability 1/10 ("whale" -> "elahw"; which
words, fixed by the copy and the document id). Reversal keeps each word's length and letters, so
the filters and the tokenizer see text of the same shape, while the word 5-grams of two copies
have a Jaccard similarity near 0.3 (0.46 against copy 0), far below dedup's 0.8: deduplication
keeps them all, and every stage's work grows with N.

`--chars N` cuts every document to its first N characters (at a space) before copying: 100x the
documents then costs a tenth of the time, and what the pipeline keeps per document shows at the
full count, with the batches the same size at every N.

Each size runs the whole pipeline (`python -m data_prep.pipeline`, the synthetic generators off:
they make the same documents at every size) in a fresh child process. The child reports its own
peak RSS (`ru_maxrss`); this process samples /proc for the worker processes' peaks (VmHWM). The
claim under test: the main process's peak stays flat from 10x to 100x, growing only by the bytes
per document that deduplication keeps (lesson 05). Throughput is input MB over wall seconds; the
mean 1-minute load average during the run says how much of the machine the run had.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.document import Document  # noqa: E402
from data_prep.pinned import pinned_documents  # noqa: E402


def perturbed(text: str, rng: random.Random, p: float = 0.1) -> str:
    """Each word (space-separated token) reversed with probability p; spacing kept as is."""
    return " ".join(w[::-1] if rng.random() < p else w for w in text.split(" "))


def cut(text: str, chars: int) -> str:
    """The first `chars` characters, ending at the last space before the cut (whole words only)."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def build_corpus(folder: Path, copies: int, chars: int = 0) -> tuple[int, float]:
    """`copies` JSON-lines files of the pinned corpus (copy 0 verbatim); returns (documents, MB)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [Document(d.id, d.source, cut(d.text, chars) if chars else d.text) for d in pinned_documents()]
    n, mb = 0, 0.0
    for k in range(copies):
        path = folder / f"copy-{k:03d}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for d in docs:
                    text = d.text if k == 0 else perturbed(d.text, random.Random(f"{k}/{d.id}"))
                    f.write(json.dumps({"text": text}) + "\n")
            tmp.rename(path)
        n += len(docs)
        mb += sum(len(d.text.encode("utf-8")) for d in docs) / 1e6   # reversal keeps the byte count
    return n, mb


def child(out: str, corpus: str, workers: int) -> None:
    """Run in the child: the pipeline on one corpus, then its own peak RSS as JSON on stdout."""
    from data_prep.pipeline import main
    t = time.perf_counter()
    manifest = main(["--out", out, "--sources", f"jsonl:{corpus}", "--synthetic", "0", "--ladder", "0",
                     "--workers", str(workers)])
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "stages": {k: v["seconds"] for k, v in manifest["stages"].items()},
                      "pool": manifest["stages"]["dedup"]["kept"]["total"]["documents"]}))


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(out: Path, corpus: Path, workers: int) -> dict:
    """One child process per size; its descendants' (the workers') peaks are sampled every 0.5 s."""
    cmd = [sys.executable, __file__, "--child", str(out), str(corpus), str(workers)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peaks: dict[int, float] = {}
    loads = []
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0.0), vm_hwm_mb(pid))
        loads.append(os.getloadavg()[0])
        time.sleep(0.5)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed on {corpus} (exit {proc.returncode}); run it by hand:\n"
                         f"  {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["worker_peak_mb"] = max(peaks.values(), default=0.0)
    result["load"] = sum(loads) / max(len(loads), 1)
    return result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="copies of the pinned corpus")
    p.add_argument("--out", default="runs/pipeline_memory")
    p.add_argument("--workers", type=int, default=0, help="processes for filters and MinHash; 0: all CPUs")
    p.add_argument("--chars", type=int, default=0, help="cut each document to this many characters; 0: whole")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a.child[0], a.child[1], int(a.child[2]))
    root, rows = Path(a.out), []
    print("| corpus | documents | MB | pool | peak RSS, main (MB) | peak RSS, one worker (MB) | seconds | MB/s | load |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in a.sizes:
        name = f"{n}x" + (f"-{a.chars}c" if a.chars else "")
        docs, mb = build_corpus(root / f"corpus-{name}", n, a.chars)
        r = measure(root / f"out-{name}", root / f"corpus-{name}", a.workers)
        rows.append({"corpus": name, "documents": docs, "mb": mb, **r})
        (root / f"result-{name}.json").write_text(json.dumps(rows[-1], indent=2))
        print(f"| {name} | {docs} | {mb:.0f} | {r['pool']} | {r['peak_rss_mb']:.0f} | {r['worker_peak_mb']:.0f} | "
              f"{r['seconds']:.0f} | {mb / r['seconds']:.2f} | {r['load']:.1f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
