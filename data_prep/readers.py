"""Your own corpus as Documents: text files, JSON Lines, Parquet, Hugging Face datasets (lesson 05).

    minilm data --sources pinned files:~/notes jsonl:data/web.jsonl:content@0.5
    for doc in read_spec("parquet:data/fineweb-edu/:text"): ...

A source spec is KIND:PATH[:FIELD][@WEIGHT], and any of them mixes with the named sources
(data_prep/sources.py) in one --sources list:

  files:DIR                 every *.txt and *.md under DIR, recursively, in sorted path order
  jsonl:PATH[:FIELD]        one document per line, its text in FIELD (default "text"); PATH is a
                            file or a folder of *.jsonl / *.jsonl.gz files
  parquet:PATH[:COLUMN]     one document per row of COLUMN (default "text"), read in record batches
                            (pyarrow); PATH is a file or a folder of *.parquet files
  hf:NAME[:CONFIG[:SPLIT]]  a Hugging Face dataset, streamed with `datasets` (split "train" by
                            default, column "text"); NAME may be a hub name (network at run time) or
                            a local folder of data files
  @WEIGHT                   keep this share of the source's documents, 0 < WEIGHT <= 1, chosen by a
                            hash of each id: the same documents on every run. (No upsampling: copies
                            would be removed by deduplication.)

Every reader is a generator that holds one document (or one record batch) at a time, so reading
costs the same memory for 1 GB as for 1 MB. pyarrow and datasets are optional: `pip install -e
".[corpus]"`. Ids are SOURCE-relative paths plus line or row numbers, stable across runs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.document import Document
from minilm import MinilmError

KINDS = ("files", "jsonl", "parquet", "hf")


def parse_spec(spec: str) -> tuple[str, list[str], float]:
    """"jsonl:data/a.jsonl:body@0.5" -> ("jsonl", ["data/a.jsonl", "body"], 0.5)."""
    body, _, weight = spec.partition("@")
    kind, _, rest = body.partition(":")
    if kind not in KINDS or not rest:
        raise MinilmError(f"source {spec!r}: expected KIND:PATH[:FIELD][@WEIGHT] with KIND one of "
                          f"{', '.join(KINDS)} (e.g. jsonl:data/web.jsonl:text@0.5)")
    try:
        w = float(weight) if weight else 1.0
    except ValueError:
        w = -1.0
    if not 0 < w <= 1:
        raise MinilmError(f"source {spec!r}: the weight must be in (0, 1], the share of its documents kept")
    return kind, rest.split(":"), w


def kept(doc_id: str, weight: float) -> bool:
    """Whether a document survives a weight: a hash of its id against the weight (deterministic)."""
    return weight >= 1 or int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < weight


def _files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MinilmError(f"{path} does not exist; a source needs a file or a folder")
    found = sorted(p for pattern in patterns for p in path.rglob(pattern) if p.is_file())
    if not found:
        raise MinilmError(f"{path} holds no {' or '.join(patterns)} files")
    return found


def read_files(root: str) -> Iterator[Document]:
    base = Path(root).expanduser()
    for path in _files(base, ("*.txt", "*.md")):
        rel = path.relative_to(base) if base.is_dir() else Path(path.name)
        yield Document(f"files/{rel}", "files", path.read_text(encoding="utf-8", errors="replace"))


def read_jsonl(root: str, field: str = "text") -> Iterator[Document]:
    base = Path(root).expanduser()
    for path in _files(base, ("*.jsonl", "*.jsonl.gz")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[field]
                except (ValueError, KeyError, TypeError) as e:
                    raise MinilmError(f"{path}, line {n + 1}: no string field {field!r} ({e!r}); "
                                      f"name the field as jsonl:PATH:FIELD") from e
                yield Document(f"jsonl/{path.name}#{n}", "jsonl", str(text))


def read_parquet(root: str, column: str = "text", batch_rows: int = 1024) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MinilmError('parquet sources need pyarrow: pip install -e ".[corpus]"') from e
    for path in _files(Path(root).expanduser(), ("*.parquet",)):
        table = pq.ParquetFile(path)
        if column not in table.schema_arrow.names:
            raise MinilmError(f"{path} has no column {column!r} (it has {table.schema_arrow.names}); "
                              f"name it as parquet:PATH:COLUMN")
        row = 0
        for batch in table.iter_batches(batch_size=batch_rows, columns=[column]):   # one batch in memory
            for text in batch.column(0).to_pylist():
                yield Document(f"parquet/{path.name}#{row}", "parquet", text or "")
                row += 1


def read_hf(name: str, config: str = "", split: str = "train", column: str = "text") -> Iterator[Document]:
    try:
        import datasets
    except ImportError as e:
        raise MinilmError('hf sources need the datasets library: pip install -e ".[corpus]"') from e
    local = Path(name).expanduser()
    stream = datasets.load_dataset(str(local) if local.is_dir() else name, config or None, split=split,
                                   streaming=True)
    for row, record in enumerate(stream):
        if column not in record:
            raise MinilmError(f"dataset {name}: no column {column!r} (it has {sorted(record)})")
        yield Document(f"hf/{name.replace('/', '_')}/{split}#{row}", "hf", record[column] or "")


def read_spec(spec: str) -> Iterator[Document]:
    """The documents of one KIND:PATH[:FIELD][@WEIGHT] source, streamed."""
    kind, args, weight = parse_spec(spec)
    reader = {"files": read_files, "jsonl": read_jsonl, "parquet": read_parquet, "hf": read_hf}[kind]
    for doc in reader(*args):
        if kept(doc.id, weight):
            yield doc
