"""A speedrun's folder as the report reads it: every stage.json, eval.json and the stages' own logs.

    run = load_run("runs/speedrun-ci", order=("data", "pretrain", ..., "report"))
    run.stages["sft"]["seconds"], run.evals["sft"]["bpb"], run.logs["ppo"][-1]["kl"], run.problems

What it reads (see lessons/12_speedrun.md):
  <stage>/stage.json   one per finished stage: seconds, tokens, params, trainable_params, result
  eval.json            {stage: the evaluation suite's metrics of the model after that stage}
  <stage>/metrics.jsonl  the per-step rows each training stage logs (pretrain, sft, dpo, ppo, ...)
  dno/summary.json, ltc/baseline.json   DNO's per-iteration win-rates, LTC's IL baseline
Every file goes through a tolerant reader: a missing or malformed file becomes a line in
`problems` naming the file and the reason, never a traceback, so a partial run still gets a report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# the suite metrics the report shows, in its column order (minilm/eval/suite.py measures them):
# the held-out skill ladder first, then the secondary columns
LADDER_COLUMNS = ("ladder_acc", "ladder_acc_mid", "ladder_ops1", "ladder_ops2", "ladder_ops3", "ladder_ops4",
                  "ladder_units", "ladder_word")
SUITE = ("bpb", "math_acc", "end_rate", "form_rate", "correct", "winrate", "winrate_sampled",
         "env_success_household", "env_success_qa", "env_success_math")
WINRATES = ("winrate", "winrate_sampled")   # cells "0.512 [0.44, 0.58]" in the report
LOGGED = ("pretrain", "sft", "hydra-sft", "dpo", "ppo", "ltc", "prune")   # stages with a metrics.jsonl


def is_number(v) -> bool:
    """An int or float that came from JSON as a number (True/False are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)



@dataclass
class RunFolder:
    """What the report knows about a run folder; `problems` collects every file that could not be read."""
    root: Path
    order: tuple[str, ...]                                     # the speedrun's stage order
    stages: dict[str, dict] = field(default_factory=dict)     # stage -> stage.json, in stage order
    missing: list[str] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, list[dict]] = field(default_factory=dict)  # stage -> its per-step/iteration rows
    ltc_baseline: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def read_json(self, rel: str, expect=dict, quiet_missing: bool = False):
        """The JSON in root/rel if it is an `expect`, else None and a line in `problems`."""
        path = self.root / rel
        if not path.exists():
            if not quiet_missing:
                self.problems.append(f"`{rel}`: missing")
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.problems.append(f"`{rel}`: not readable JSON ({type(e).__name__}: {e})")
            return None
        if not isinstance(value, expect):
            self.problems.append(f"`{rel}`: a JSON {type(value).__name__}, expected a {expect.__name__}")
            return None
        return value

    def read_jsonl(self, rel: str) -> list[dict]:
        """The JSON objects of root/rel, one per line; bad lines are skipped and counted in `problems`."""
        path = self.root / rel
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(f"`{rel}`: not readable ({type(e).__name__})" if path.exists()
                                 else f"`{rel}`: missing")
            return []
        rows, bad = [], []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:
                row = None
            if not isinstance(row, dict):
                bad.append(i)
            elif row:
                rows.append(row)
        if bad:
            self.problems.append(f"`{rel}`: skipped {len(bad)} line(s) that are not JSON objects "
                                 f"(first: line {bad[0]})")
        return rows


def load_run(run_dir, order: tuple[str, ...]) -> RunFolder:
    """Read every stage.json (in `order`, the speedrun's stage order) and eval.json; never raises on a
    bad file."""
    run = RunFolder(Path(run_dir), tuple(order))
    for stage in order[:-1]:              # the report stage finishes after this report is written
        record = run.read_json(f"{stage}/stage.json", quiet_missing=True)
        if record is None:
            run.missing.append(stage)
            continue
        for key in ("seconds", "tokens", "params", "trainable_params"):
            if key in record and record[key] is not None and not is_number(record[key]):
                run.problems.append(f"`{stage}/stage.json`: {key} is {record[key]!r}, not a number")
                record[key] = None
        if not isinstance(record.get("result", {}), dict):
            run.problems.append(f"`{stage}/stage.json`: result is not an object")
            record["result"] = {}
        run.stages[stage] = record
    evals = run.read_json("eval.json", quiet_missing="eval" not in run.stages) or {}
    rows = [s for s in order if s in evals] + [s for s in evals if s not in order]
    for name in rows:
        if isinstance(evals[name], dict):
            run.evals[name] = evals[name]
        else:
            run.problems.append(f"`eval.json`: the entry {name!r} is not an object of metrics")
    _load_logs(run)
    return run


def _load_logs(run: RunFolder) -> None:
    """The finished stages' own logs, which the plots draw (a finished stage without one: a problem)."""
    for stage in LOGGED:
        if stage in run.stages:
            run.logs[stage] = run.read_jsonl(f"{stage}/metrics.jsonl")
    if "dno" in run.stages:   # DNO logs one row per iteration in summary.json (also its stage result)
        result = run.stages["dno"]["result"]
        summary = run.read_json("dno/summary.json", quiet_missing="rows" in result) or {}
        rows = summary.get("rows", result.get("rows"))
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            run.logs["dno"] = rows
    if "ltc" in run.stages:
        base = run.stages["ltc"]["result"].get("baseline")
        base = base if isinstance(base, dict) else run.read_json("ltc/baseline.json")
        run.ltc_baseline = base or {}

