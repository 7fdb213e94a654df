"""The speedrun's report card: report.md and report/*.png from a run folder (lesson 12).

    minilm speedrun --only report --out-dir runs/speedrun-ci --preset ci   # (re)writes the report alone
    from minilm.speedrun.report import write_report
    write_report("runs/speedrun-ci", tuple(STAGES), title="ci preset")   # -> Path(".../report.md")

What it reads (the run folder of `minilm speedrun`, through minilm/speedrun/run_folder.py):
  <stage>/stage.json   one per finished stage: seconds, tokens, params, trainable_params, result
  eval.json            {stage: the evaluation suite's metrics of the model after that stage}
  and, for the plots, what the stages already log:
  pretrain/metrics.jsonl  step, loss, val_loss, phase                      (minilm/stages/pretrain.py)
  sft|dpo|hydra-sft/metrics.jsonl  step, loss, eval_loss                  (minilm/loop.py)
  ppo/metrics.jsonl    step, score (the reward), kl, vf_loss               (minilm/stages/ppo.py)
  dno/summary.json     rows: per iteration vs_sft/vs_prev/vs_teacher win-rates (minilm/stages/dno.py)
  ltc/metrics.jsonl + ltc/baseline.json  iteration, test_success, ...      (minilm/stages/ltc.py)
  prune/metrics.jsonl  step, density, task_loss, heldout_loss              (minilm/stages/prune.py)
The figures are drawn by minilm/speedrun/report_plots.py, whose docstring says what each one shows.
The report is modelled on nanochat's report card: one table of what every stage cost (time,
tokens, parameters) and what it bought (the same evaluation suite after each stage), then plots.
A missing or malformed file becomes a line under "Problems" naming the file and the reason,
never a traceback, so a partial run still gets a report. Without matplotlib it is text only.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.speedrun.report_plots import PLOT_TEXT, write_plots
from minilm.speedrun.run_folder import LADDER_COLUMNS, SUITE, WINRATES, RunFolder, is_number, load_run
from minilm.weights import write_text

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
    picks = [(label, v) for label, v in picks if is_number(v)]   # a stage may not log every field
    if not picks:
        picks = [(k, v) for k, v in result.items() if is_number(v)][:2]
    return ", ".join(f"{label} {v:,}" if isinstance(v, int) else f"{label} {v:.4g}"
                     for label, v in picks) or "-"


def stage_table(run: RunFolder) -> list[str]:
    lines = ["| stage | title | time | tokens trained | parameters | trainable | headline |",
             "|---|---|---:|---:|---:|---:|---|"]
    for stage, r in run.stages.items():
        seconds = f"{r['seconds']:.1f} s" if is_number(r.get("seconds")) else "-"
        seconds += " *" if r.get("resumed") is True else ""     # footnoted in render()
        lines.append(f"| {stage} | {r.get('title') or '-'} | {seconds} | {_count(r.get('tokens'))} | "
                     f"{_count(r.get('params'))} | {_count(r.get('trainable_params'))} | "
                     f"{headline(stage, r.get('result') or {})} |")
    return lines


def _winrate_cell(m: dict, name: str = "winrate") -> str:
    if not is_number(m.get(name)):
        return "-"
    lo, hi = m.get(f"{name}_lo"), m.get(f"{name}_hi")
    interval = f" [{lo:.2f}, {hi:.2f}]" if is_number(lo) and is_number(hi) else ""
    return f"{m[name]:.3f}{interval}"


def gain_cell(m: dict) -> str:
    """"+0.123 [+0.080, +0.170]": the difference from SFT on the same items, with its 95% interval."""
    if not is_number(m.get("ladder_gain")):
        return "-"
    return f"{m['ladder_gain']:+.3f} [{m['ladder_gain_lo']:+.3f}, {m['ladder_gain_hi']:+.3f}]"


def ladder_table(run: RunFolder) -> list[str]:
    """The held-out ladder: accuracy, gain over SFT with its interval, then the middle rungs and each rung."""
    rungs = [c.removeprefix("ladder_") for c in LADDER_COLUMNS[1:]]
    lines = ["| model after | ladder acc | gain over SFT [95%] | " + " | ".join(rungs) + " |",
             "|---|---:|---:|" + "---:|" * len(rungs)]
    for name, m in run.evals.items():
        cells = [_fmt(m.get("ladder_acc")), gain_cell(m), *(_fmt(m.get(c)) for c in LADDER_COLUMNS[1:])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def eval_table(run: RunFolder) -> list[str]:
    header = [f"{c} [lo, hi]" if c in WINRATES else c for c in SUITE]
    lines = ["| model after | " + " | ".join(header) + " |", "|---|" + "---:|" * len(SUITE)]
    for name, m in run.evals.items():
        cells = [_winrate_cell(m, c) if c in WINRATES else _fmt(m.get(c)) for c in SUITE]
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
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, {device}, "
            f"{os.cpu_count()} CPU cores ({platform.system()} {platform.machine()})")


def _header(run: RunFolder, title: str | None) -> list[str]:
    presets = [r.get("preset", r["result"].get("preset")) for r in run.stages.values()]
    preset = next((p for p in presets if isinstance(p, str)), None)
    title = title or f"minilm speedrun{f' ({preset} preset)' if preset else ''}: {run.root.name}"
    corpus = run.stages.get("data", {}).get("result", {}).get("corpus_fingerprint")   # same bytes, same value
    seconds = sum(r["seconds"] for r in run.stages.values() if is_number(r.get("seconds")))
    tokens = sum(r["tokens"] for r in run.stages.values() if is_number(r.get("tokens")))
    return [f"# {title}", "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            *([f"- preset: {preset}"] if preset else []),
            f"- machine: {machine()}",
            f"- git commit: {_git_commit()}",
            *([f"- corpus fingerprint: `{corpus}`"] if isinstance(corpus, str) else []),
            # order - 1: the report stage is still running while it writes this, so it has no record
            f"- total time: {seconds:.1f} s ({seconds / 60:.1f} min) over {len(run.stages)} of "
            f"{len(run.order) - 1} stages; {_count(tokens)} tokens trained", ""]


def render(run: RunFolder, plots: list[str] | None, title: str | None = None) -> str:
    """report.md's text; plots None means matplotlib is missing."""
    lines = _header(run, title) + ["## What each stage bought: the held-out skill ladder", ""]
    if run.evals:   # the headline first: what each method bought on problems no stage trained on
        lines += ["Greedy accuracy on held-out ladder problems (no training stage ever saw them); the gain "
                  "is the difference from the SFT model on the same problems, with a 95% paired bootstrap "
                  "interval: an interval that excludes 0 is a gain the problems support.", "",
                  *ladder_table(run), ""]
    else:
        lines += ["No evaluation results (`eval.json`).", ""]
    lines += ["## Stages", "", *stage_table(run), ""]
    if any(r.get("resumed") is True for r in run.stages.values()):
        lines += ["\\* resumed after an interruption: the time is that of the last attempt only.", ""]
    if run.missing:
        lines += ["Missing stages (not run, not finished or no readable stage.json): "
                  f"{', '.join(run.missing)}.", ""]
    plotted = [f"[{p}]({p})" for r in run.stages.values() if isinstance(r.get("plots"), list)
               for p in r["plots"] if isinstance(p, str)]
    if plotted:
        lines += ["The stages' own figures: " + ", ".join(plotted) + ".", ""]
    if run.evals:
        lines += ["## The other measurements (the same suite, after each stage)", "", *eval_table(run), ""]
    lines += ["## Plots", ""]
    if plots is None:
        lines += ["matplotlib is not installed, so this report is text only "
                  "(`pip install matplotlib`, then `minilm speedrun --only report`).", ""]
    for name in plots or []:
        lines += [f"![{name}](report/{name})", "", PLOT_TEXT[name], ""]
    if plots == []:
        lines += ["No plot: none of the stages that draw one has logged data yet.", ""]
    if run.problems:
        lines += ["## Problems", "", *[f"- {p}" for p in run.problems], ""]
    return "\n".join(lines)


def write_report(run_dir, order: tuple[str, ...], title: str | None = None) -> Path:
    """Write run_dir/report.md (and run_dir/report/*.png when matplotlib is there); returns its path.
    `order` is the speedrun's stage order (tuple(minilm.speedrun.stages.STAGES))."""
    root = Path(run_dir)
    if not root.is_dir():
        raise MinilmError(f"{root} is not a run folder; run `minilm speedrun --out-dir {root}` first")
    run = load_run(root, order)
    plots = write_plots(run, root / "report")
    return write_text(root / "report.md", render(run, plots, title))
