"""Check the speedrun numbers that the README and the lessons quote against a run's own files.

    minilm speedrun                                          # writes runs/speedrun-laptop/eval.json
    python lessons/quoted_numbers.py runs/speedrun-laptop           # every quoted speedrun table, checked
    python lessons/quoted_numbers.py runs/speedrun-laptop --tol 0.02 README.md

Two kinds of markdown table are quoted from a run (TABLES): those whose header starts
"| model after |" from its eval.json (README.md, lessons/12_speedrun.md), each row naming a model in
its first cell ("dno (best iterate: 1)" is dno); and those whose header starts "| step | phase |"
from pretrain/metrics.jsonl (lesson 03's pretraining curve), each row naming an evaluated step.
Each column header names a field of that row (COLUMNS). A quoted number passes when it equals the
run's, rounded as printed, or lies within --tol of it. Every failure is printed with its file,
line, column and both values; the exit status is 1 if any.

The laptop speedrun is deterministic on one machine (fresh clones reproduce the ladder table to
the last digit); another CPU may round its bf16 matmuls differently, which is what --tol is for.
tests/test_quoted_numbers.py runs a fresh laptop speedrun and this check (a `slow` test, ~20 minutes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUOTING = ("README.md", "lessons/03_pretraining.md", "lessons/12_speedrun.md")   # files quoting the laptop speedrun
# a quoted table's header start -> the file in the run's folder its rows come from
TABLES = {"| model after |": "eval.json", "| step | phase |": "pretrain/metrics.jsonl"}
# column header -> eval.json field(s): one number, or (value, lo, hi) written "v [lo, hi]"
COLUMNS = {"ladder acc": "ladder_acc", "mid rungs": "ladder_acc_mid", "bpb": "bpb", "math_acc": "math_acc",
           "end_rate": "end_rate", "form_rate": "form_rate", "correct": "correct",
           "env math": "env_success_math", "env household": "env_success_household", "env qa": "env_success_qa",
           "gain over SFT [95%]": ("ladder_gain", "ladder_gain_lo", "ladder_gain_hi"),
           "winrate vs SFT [95%]": ("winrate", "winrate_lo", "winrate_hi"),
           "sampled (T = 0.7)": ("winrate_sampled", "winrate_sampled_lo", "winrate_sampled_hi"),
           **{r: f"ladder_{r}" for r in ("ops1", "ops2", "ops3", "ops4", "units", "word")},
           # pretrain/metrics.jsonl
           "phase": "phase", "train loss": "loss", "val loss": "val_loss", "val bits/byte": "val_bpb"}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def cells(line: str) -> list[str]:
    return [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]


def quoted_rows(text: str, table: str):
    """(line number, header, row cells) of every row of every table whose header starts `table`."""
    header = None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            header = None
        elif line.startswith(table):
            header = cells(line)
        elif header and not set(line) <= set("|-: "):
            yield i, header, cells(line)


def matches(quoted: str, actual: float, tol: float) -> bool:
    """Equal once rounded as quoted ("0.307" is 0.3067 to three places), or within tol."""
    places = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - actual) <= max(tol, 0.5 * 10 ** -places + 1e-12)


def check(path: Path, results: dict, tol: float, table: str = "| model after |") -> tuple[int, list[str]]:
    """(numbers checked, one message per mismatch) for the `table` tables of one markdown file;
    results: each row's fields by its first cell (a model's name, a step)."""
    checked, errors = 0, []
    for line_no, header, row in quoted_rows(path.read_text(encoding="utf-8"), table):
        model = row[0].split(" (")[0]
        if model not in results:
            errors.append(f"{path}:{line_no}: {header[0].split()[0]} {model!r} is not in the run's {TABLES[table]}")
            continue
        for column, cell in zip(header[1:], row[1:]):
            fields = COLUMNS.get(column)
            if fields is None or cell in ("-", ""):
                continue
            fields = (fields,) if isinstance(fields, str) else fields
            numbers = NUMBER.findall(cell)
            if len(numbers) != len(fields):
                errors.append(f"{path}:{line_no}: {model} / {column}: {cell!r} does not read as {len(fields)} number(s)")
                continue
            for quoted, field in zip(numbers, fields):
                actual = results[model].get(field)
                checked += 1
                if actual is None or not matches(quoted, actual, tol):
                    errors.append(f"{path}:{line_no}: {model} / {column}: quoted {quoted}, the run has "
                                  f"{'nothing' if actual is None else f'{actual:.4f}'} ({field})")
    return checked, errors


def load(path: Path) -> dict:
    """eval.json as it is (model -> fields), or metrics.jsonl's evaluated rows by step ("400" -> row)."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {str(row["step"]): row for row in rows if "val_loss" in row}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a laptop speedrun's folder (it holds eval.json)")
    p.add_argument("files", nargs="*", help=f"markdown files to check (default: {', '.join(QUOTING)})")
    p.add_argument("--tol", type=float, default=0.0, help="allowed absolute difference beyond rounding")
    args = p.parse_args(argv)
    for source in TABLES.values():
        if not (Path(args.run_dir) / source).is_file():
            print(f"error: {Path(args.run_dir) / source} not found; run `minilm speedrun` (it writes "
                  f"{', '.join(TABLES.values())}) or pass the run's folder", file=sys.stderr)
            return 2
    results = {table: load(Path(args.run_dir) / source) for table, source in TABLES.items()}
    total, failures = 0, []
    for name in args.files or QUOTING:
        path = Path(name) if Path(name).exists() else ROOT / name
        counts = [check(path, results[table], args.tol, table) for table in TABLES]
        total += sum(c for c, _ in counts)
        failures += [e for _, errors in counts for e in errors]
        print(f"{name}: {sum(c for c, _ in counts)} numbers checked, {sum(len(e) for _, e in counts)} differ")
    print("\n".join(failures) if failures else f"all {total} quoted numbers match {args.run_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
