"""Map a function over documents in worker processes, in order: in one call, or batch after batch.

    reasons = parallel_map(partial(drop_reason, cfg=cfg), texts, workers=2, desc="filters")
    with WorkerPool(2) as pool:                 # one pool for many batches (the streamed pipeline)
        for batch in batches: reasons = pool.map(partial(drop_reason, cfg=cfg), batch)

The per-document stages of the pipeline (filters, MinHash signatures) are pure functions of one
document's text, so they split across processes with no coordination: datatrove and the FineWeb
scripts scale the same way, one shard of documents per task. Results come back in input order,
so a run with 8 workers writes byte-identical shards to a run with 1.

`workers=1` (or a short list) runs in this process: no start-up cost, and tracebacks stay plain.
`fn` must be picklable (a module-level function, or a `functools.partial` of one), and a script
that calls this with workers > 1 needs the `if __name__ == "__main__":` guard, as every
multiprocessing program does outside fork (workers start from a fresh interpreter).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence

from tqdm import tqdm

# Below this many items a pool's start-up (tens of milliseconds per worker) costs more than it saves.
MIN_PARALLEL_ITEMS = 64


def default_workers() -> int:
    """The CPUs this process may use (the affinity mask, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class WorkerPool:
    """A process pool kept open across calls, so a stream of batches pays the start-up once.

    `map(fn, items)` is `[fn(x) for x in items]` in input order; with one worker, or a short list,
    it runs in this process."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.pool = workers, None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            # forkserver, not fork: this process has imported torch, and forking a process whose
            # OpenMP thread pool is running can deadlock the child.
            self.pool = mp.get_context("spawn" if os.name == "nt" else "forkserver").Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def imap(self, fn: Callable, items: Sequence, chunksize: int | None = None):
        if self.pool is None or len(items) < MIN_PARALLEL_ITEMS:
            return map(fn, items)
        # Several chunks per worker balance the load (documents differ in length by 1000x) while
        # keeping the per-chunk pickling overhead small.
        return self.pool.imap(fn, items, chunksize=chunksize or max(1, len(items) // (self.workers * 8)))

    def map(self, fn: Callable, items: Sequence, chunksize: int | None = None) -> list:
        return list(self.imap(fn, items, chunksize))


def parallel_map(fn: Callable, items: Sequence, workers: int = 1, desc: str | None = None,
                 progress: bool = True, chunksize: int | None = None) -> list:
    """[fn(x) for x in items], computed by `workers` processes; the order of `items` is kept."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = dict(total=len(items), desc=desc, unit="doc", disable=not progress)
    with WorkerPool(workers if len(items) >= MIN_PARALLEL_ITEMS else 1) as pool:   # no pool for a few
        return list(tqdm(pool.imap(fn, items, chunksize), **bar))
