"""The speedrun's report card: report.md and report/*.png from a run folder (issue 10, lesson 12).

    python -m minilm.eval.report runs/speedrun-ci          # (re)writes runs/speedrun-ci/report.md
    from minilm.eval.report import write_report
    write_report("runs/speedrun-ci", title="ci preset")    # -> Path("runs/speedrun-ci/report.md")

What it reads (the run folder of `minilm speedrun`, see lessons/12_speedrun.md):
  <stage>/stage.json   one per finished stage: seconds, tokens, params, trainable_params, result
  eval.json            {stage: the evaluation suite's metrics of the model after that stage}
  and, for the plots, what the stages already log (read here into Run.logs):
  pretrain/metrics.jsonl  step, loss, val_loss, phase                      (minilm/train.py)
  sft|dpo|hydra-sft/metrics.jsonl  step, loss, eval_loss                  (minilm/post/loop.py)
  ppo/metrics.jsonl    step, score (the reward), kl, vf_loss               (minilm/post/ppo_loop.py)
  dno/summary.json     rows: per iteration vs_sft/vs_prev/vs_teacher win-rates (minilm/post/dno_loop.py)
  ltc/metrics.jsonl + ltc/baseline.json  iteration, test_success, ...      (minilm/agents/ltc.py)
  prune/metrics.jsonl  step, density, task_loss, heldout_loss              (minilm/prune/apply.py)
The figures are drawn by minilm/eval/report_plots.py, whose docstring says what each one shows.
The report is modelled on nanochat's report card: one table of what every stage cost (time,
tokens, parameters) and what it bought (the same evaluation suite after each stage), then plots.
Every file goes through a tolerant reader: a missing or malformed file becomes a line under
"Problems" naming the file and the reason, never a traceback, so a partial run still gets a report.
matplotlib is optional: without it the report is text only and says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minilm import MinilmError
from minilm.eval.report_plots import PLOT_TEXT, SUITE, is_number, write_plots
from minilm.stages import STAGES as SPEEDRUN_STAGES

STAGES = tuple(SPEEDRUN_STAGES)  # the speedrun's order: data, pretrain, sft, ..., eval, report
LOGGED = ("pretrain", "sft", "hydra-sft", "dpo", "ppo", "ltc", "prune")   # stages with a metrics.jsonl
# (label, dotted path into stage.json's "result"): the one or two numbers that say how a stage went
HEADLINES = {
    "data": [("phase 1 train tokens", "phases.phase1.train.tokens"),
             ("phase 2 train tokens", "phases.phase2.train.tokens")],
    "pretrain": [("val loss", "val_loss"), ("val bpb", "val_bpb")],
    "sft": [("correct", "after.correct_rate"), ("final loss", "final_loss")],
    "dpo": [("held-out DPO loss", "eval_loss"), ("preferred over SFT", "dpo_vs_sft.preferred_rate")],
    "hydra-sft": [("RM accuracy", "after.eval_accuracy"), ("final loss", "final_loss")],
    "ppo": [("correct", "after.correct_rate"), ("final KL", "final_kl")],
    "dno": [("best iteration", "best_iteration"), ("last vs SFT", "rows.-1.vs_sft.win_rate")],
    "ltc": [("success", "ltc.success"), ("IL success", "baseline.success")],
    "prune": [("held-out loss", "after.heldout_loss"), ("compact params", "compact.params")],
}


@dataclass
class Run:
    """What the report knows about a run folder; `problems` collects every file that could not be read."""
    root: Path
    stages: dict[str, dict] = field(default_factory=dict)     # stage -> stage.json, in STAGES order
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


def load_run(run_dir) -> Run:
    """Read every stage.json (in stage order) and eval.json; never raises on a bad file."""
    run = Run(Path(run_dir))
    for stage in STAGES[:-1]:             # the report stage finishes after this report is written
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
    order = [s for s in STAGES if s in evals] + [s for s in evals if s not in STAGES]
    for name in order:
        if isinstance(evals[name], dict):
            run.evals[name] = evals[name]
        else:
            run.problems.append(f"`eval.json`: the entry {name!r} is not an object of metrics")
    _load_logs(run)
    return run


def _load_logs(run: Run) -> None:
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


def _dig(obj, path: str):
    """obj["a"]["b"][-1]... for path "a.b.-1"; None where anything is missing."""
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _fmt(v, spec: str = ".3f") -> str:
    return format(v, spec) if is_number(v) else "-"


def _count(v) -> str:
    return f"{int(v):,}" if is_number(v) and math.isfinite(v) else "-"


def headline(stage: str, result: dict) -> str:
    """One or two numbers from a stage's result (HEADLINES, else its first two numeric fields)."""
    picks = [(label, _dig(result, path)) for label, path in HEADLINES.get(stage, [])]
    picks = [(label, v) for label, v in picks if is_number(v)]
    if not picks:
        picks = [(k, v) for k, v in result.items() if is_number(v)][:2]
    return ", ".join(f"{label} {v:,}" if isinstance(v, int) else f"{label} {v:.4g}"
                     for label, v in picks) or "-"


def stage_table(run: Run) -> list[str]:
    lines = ["| stage | title | time | tokens trained | parameters | trainable | headline |",
             "|---|---|---:|---:|---:|---:|---|"]
    for stage, r in run.stages.items():
        seconds = f"{r['seconds']:.1f} s" if is_number(r.get("seconds")) else "-"
        seconds += " *" if r.get("resumed") is True else ""
        lines.append(f"| {stage} | {r.get('title') or '-'} | {seconds} | {_count(r.get('tokens'))} | "
                     f"{_count(r.get('params'))} | {_count(r.get('trainable_params'))} | "
                     f"{headline(stage, r.get('result') or {})} |")
    return lines


def _winrate_cell(m: dict) -> str:
    if not is_number(m.get("winrate")):
        return "-"
    interval = (f" [{m['winrate_lo']:.2f}, {m['winrate_hi']:.2f}]"
                if is_number(m.get("winrate_lo")) and is_number(m.get("winrate_hi")) else "")
    return f"{m['winrate']:.3f}{interval}"


def eval_table(run: Run) -> list[str]:
    header = [c if c != "winrate" else "winrate [lo, hi]" for c in SUITE]
    lines = ["| model after | " + " | ".join(header) + " |", "|---|" + "---:|" * len(SUITE)]
    for name, m in run.evals.items():
        cells = [_winrate_cell(m) if c == "winrate" else _fmt(m.get(c)) for c in SUITE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _git_commit() -> str:
    """Short commit of the minilm checkout (+ a note when it has uncommitted changes), or why not."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git is not available)"
    if sha.returncode != 0:
        return "unknown (not a git checkout)"
    return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> str:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, {device}, "
            f"{os.cpu_count()} CPU cores ({platform.system()} {platform.machine()})")


def _header(run: Run, title: str | None) -> list[str]:
    presets = [r.get("preset", r["result"].get("preset")) for r in run.stages.values()]
    preset = next((p for p in presets if isinstance(p, str)), None)
    title = title or f"minilm speedrun{f' ({preset} preset)' if preset else ''}: {run.root.name}"
    seconds = sum(r["seconds"] for r in run.stages.values() if is_number(r.get("seconds")))
    tokens = sum(r["tokens"] for r in run.stages.values() if is_number(r.get("tokens")))
    return [f"# {title}", "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            *([f"- preset: {preset}"] if preset else []),
            f"- machine: {machine()}",
            f"- git commit: {_git_commit()}",
            f"- total time: {seconds:.1f} s ({seconds / 60:.1f} min) over {len(run.stages)} of "
            f"{len(STAGES) - 1} stages; {_count(tokens)} tokens trained", ""]


def render(run: Run, plots: list[str] | None, title: str | None = None) -> str:
    """report.md's text; plots None means matplotlib is missing."""
    lines = _header(run, title) + ["## Stages", "", *stage_table(run), ""]
    if any(r.get("resumed") is True for r in run.stages.values()):
        lines += ["\\* resumed after an interruption: the time is that of the last attempt only.", ""]
    if run.missing:
        lines += ["Missing stages (not run, not finished or no readable stage.json): "
                  f"{', '.join(run.missing)}.", ""]
    plotted = [f"[{p}]({p})" for r in run.stages.values() if isinstance(r.get("plots"), list)
               for p in r["plots"] if isinstance(p, str)]
    if plotted:
        lines += ["The stages' own figures: " + ", ".join(plotted) + ".", ""]
    lines += ["## What each stage bought (the evaluation suite after each stage)", ""]
    lines += [*eval_table(run), ""] if run.evals else ["No evaluation results (`eval.json`).", ""]
    lines += ["## Plots", ""]
    if plots is None:
        lines += ["matplotlib is not installed, so this report is text only "
                  "(`pip install matplotlib`, then `python -m minilm.eval.report RUN_DIR`).", ""]
    for name in plots or []:
        lines += [f"![{name}](report/{name})", "", PLOT_TEXT[name], ""]
    if plots == []:
        lines += ["No plot: none of the stages that draw one has logged data yet.", ""]
    if run.problems:
        lines += ["## Problems", "", *[f"- {p}" for p in run.problems], ""]
    return "\n".join(lines)


def write_report(run_dir, title: str | None = None) -> Path:
    """Write run_dir/report.md (and run_dir/report/*.png when matplotlib is there); returns its path."""
    root = Path(run_dir)
    if not root.is_dir():
        raise MinilmError(f"{root} is not a run folder; run `minilm speedrun --out-dir {root}` first")
    run = load_run(root)
    plots = write_plots(run, root / "report")
    path = root / "report.md"
    tmp = root / "report.md.tmp"
    tmp.write_text(render(run, plots, title))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m minilm.eval.report RUN_DIR")
    print(write_report(sys.argv[1]))
