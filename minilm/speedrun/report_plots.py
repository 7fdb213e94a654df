"""The speedrun report's figures: report/*.png from a run folder's logs (lesson 12).

    from minilm.speedrun.run_folder import load_run
    write_plots(load_run("runs/speedrun-ci", order), Path("runs/speedrun-ci/report"))  # -> names drawn

minilm/speedrun/report.py reads the run folder (run_folder.py) and calls `write_plots`; this module
only draws. Each figure, and what it reads (paths relative to the run folder):
  gains.png          eval.json: each stage's held-out ladder gain over SFT with its 95% interval
  stages.png         eval.json: one panel per suite metric (SUITE), one bar per model evaluated
  pretrain_loss.png  pretrain/metrics.jsonl (step, loss, val_loss, phase) and the unigram_entropy
                     of pretrain/stage.json's result; drawn by minilm.plots.plot_losses
  post_losses.png    sft|hydra-sft|dpo/metrics.jsonl: step, loss and, where logged, eval_loss
  ppo.png            ppo/metrics.jsonl: step, score, kl, vf_loss; drawn by minilm.plots.plot_ppo
  dno_winrate.png    dno/summary.json rows (vs_sft/vs_prev/vs_teacher); post.winrate.plot_winrates
  ltc_curves.png     ltc/metrics.jsonl + ltc/baseline.json; drawn by minilm.plots.plot_curves
  prune.png          prune/metrics.jsonl: density, task_loss, heldout_loss, and the dense model's
                     held-out loss (result.before.heldout_loss of prune/stage.json) at density 1
A figure is drawn only when its data exist; matplotlib is optional (no matplotlib: no figures).
"""

from __future__ import annotations

import math
from pathlib import Path

from minilm.plots import plot_curves, plot_losses, pyplot
from minilm.plots import plot_ppo as draw_ppo
from minilm.post.winrate import plot_winrates
from minilm.speedrun.run_folder import SUITE, RunFolder, is_number

POST_STAGES = ("sft", "hydra-sft", "dpo")
PLOT_TEXT = {
    "gains.png": "What each stage bought: held-out skill-ladder accuracy minus the SFT model's on the same "
                 "problems, with 95% paired bootstrap intervals; a bar whose interval clears 0 is a real "
                 "gain on these problems (seed-to-seed spread is measured in benchmarks/).",
    "stages.png": "What each stage bought: one panel per suite metric, one bar per model evaluated after "
                  "each stage (lower bpb is better, higher is better for every rate; the win-rate bars "
                  "carry their 95% interval and 0.5 means as good as the SFT model).",
    "pretrain_loss.png": "Pretraining loss in nats/token: the training curve, validation points, the "
                         "unigram entropy to beat (dashed) and the step where phase-2 data starts (dotted).",
    "post_losses.png": "Training loss per step of each post-training stage as it optimised it (SFT: "
                       "next-token loss on assistant tokens; Hydra-SFT: that plus the reward head's "
                       "Bradley-Terry loss; DPO: the preference loss, log 2 = 0.69 at the start, plus "
                       "the SFT term when it has one), with the held-out loss where the stage logged one.",
    "ppo.png": "PPO per rollout batch: mean reward (score), KL to the reference in nats per reply, and the "
               "critic's value loss; reward should rise while the KL stays moderate (a KL that runs away "
               "means the policy is exploiting the reward).",
    "dno_winrate.png": "DNO win-rate of each iterate against SFT, the previous iterate and the teacher "
                       "under DNO's own verifier on its held-out test prompts (not the suite's judge), with 95% Wilson bands (above 0.5 = better) and the mean "
                       "reply length dotted, since judges favour longer replies.",
    "ltc_curves.png": "LTC per iteration: held-out and exploration success against the instruction-tuned "
                      "baseline (dashed), and the mean update losses on the right.",
    "prune.png": "Pruning: held-out loss against the fraction of FFN neurons kept, read left to right as "
                 "the run goes on (density falls); the gap to the dense start is what pruning cost.",
}


def _save(fig, plt, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _integer_steps(ax) -> None:
    """Steps and iterations are whole numbers: no 10.5 tick when a stage logged two points."""
    # optional dependency, imported here: only reached once pyplot() found matplotlib
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def plot_gains(run: RunFolder, path: Path) -> bool:
    """One bar per stage after SFT: its ladder gain, with the asymmetric 95% interval as error bars."""
    keys = ("ladder_gain", "ladder_gain_lo", "ladder_gain_hi")
    rows = [(n, m) for n, m in run.evals.items() if all(is_number(m.get(k)) for k in keys)]
    plt = pyplot()
    if not rows or plt is None:
        return False
    gains = [m["ladder_gain"] for _, m in rows]
    err = [[g - m["ladder_gain_lo"] for g, (_, m) in zip(gains, rows)],
           [m["ladder_gain_hi"] - g for g, (_, m) in zip(gains, rows)]]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(rows) + 2), 3.6))
    colors = ["tab:green" if m["ladder_gain_lo"] > 0 else "tab:red" if m["ladder_gain_hi"] < 0 else "tab:gray"
              for _, m in rows]
    bars = ax.bar(range(len(rows)), gains, yerr=err, capsize=4, color=colors)
    ax.bar_label(bars, [f"{g:+.3f}" for g in gains], fontsize=8, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [n for n, _ in rows])
    ax.set(ylabel="ladder accuracy - SFT's", title="what each stage bought on held-out problems (95% CI)")
    return _save(fig, plt, path)


def plot_stages(run: RunFolder, path: Path) -> bool:
    """Small multiples, four to a row: one panel per suite metric, one labelled bar per model."""
    names, values = list(run.evals), list(run.evals.values())
    metrics = [c for c in SUITE if any(is_number(m.get(c)) for m in values)]
    plt = pyplot()
    if not metrics or plt is None:
        return False
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2 * cols, 0.45 * len(names) * cols), 3.2 * rows),
                             squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        ys = [m[key] if is_number(m.get(key)) else float("nan") for m in values]
        err = None
        if key == "winrate":   # asymmetric interval bars: (below, above) the point
            err = [[y - m["winrate_lo"] if is_number(m.get("winrate_lo")) else 0 for y, m in zip(ys, values)],
                   [m["winrate_hi"] - y if is_number(m.get("winrate_hi")) else 0 for y, m in zip(ys, values)]]
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        bars = ax.bar(range(len(names)), ys, yerr=err, capsize=3, color="tab:blue")
        # the value on each bar: a rate of 0 is a result, a missing one is "n/a", not an empty slot
        ax.bar_label(bars, [f"{y:.2f}" if math.isfinite(y) else "" for y in ys], fontsize=7, padding=1)
        for i in (i for i, y in enumerate(ys) if not math.isfinite(y)):   # bar_label skips NaN bars
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        if key == "bpb":
            ax.set(title="bpb (lower is better)", ylim=(0, 1.15 * max((y for y in ys if math.isfinite(y)))))
        else:           # every other metric is a rate in [0, 1]: one scale for all panels
            ax.set(title=f"{key} (higher is better)", ylim=(0, 1.1))
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("evaluation suite on the model after each stage")
    return _save(fig, plt, path)


def _post_labels(stage: str, rows: list[dict]) -> dict[str, str]:
    """Legend labels that say what each curve is: DPO's eval_loss is the preference loss alone."""
    if stage == "dpo" and any("chosen_nll" in r for r in rows):
        return {"loss": "train (DPO + SFT term)", "eval_loss": "held-out (DPO loss only)"}
    return {"loss": "train", "eval_loss": "held-out"}


def plot_post_losses(run: RunFolder, path: Path) -> bool:
    """Train loss (and held-out eval_loss) per step for SFT, Hydra-SFT and DPO, a panel each."""
    series = {s: [r for r in run.logs.get(s, []) if is_number(r.get("step"))] for s in POST_STAGES}
    series = {s: rows for s, rows in series.items() if any(is_number(r.get("loss")) for r in rows)}
    plt = pyplot()
    if not series or plt is None:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], series.items()):
        labels = _post_labels(stage, rows)
        for key, style in (("loss", ".-"), ("eval_loss", "o--")):
            pts = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), style, label=labels[key])
        ax.set(xlabel="step", ylabel="loss", title=stage)
        _integer_steps(ax)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("post-training losses")
    return _save(fig, plt, path)


def plot_prune(run: RunFolder, path: Path) -> bool:
    """Held-out (and training) loss against FFN density over the pruning run, dense start to the end."""
    rows = [r for r in run.logs.get("prune", []) if is_number(r.get("density"))]
    held = [(r["density"], r["heldout_loss"]) for r in rows if is_number(r.get("heldout_loss"))]
    before = run.stages.get("prune", {}).get("result", {}).get("before")
    if isinstance(before, dict) and is_number(before.get("heldout_loss")):
        held.insert(0, (1.0, before["heldout_loss"]))   # the dense model, measured before pruning
    plt = pyplot()
    if not held or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.8))
    train = [(r["density"], r["task_loss"]) for r in rows if is_number(r.get("task_loss"))]
    if train:
        ax.plot(*zip(*train), ".-", color="tab:gray", alpha=0.6, lw=0.8, label="training task loss")
    ax.plot(*zip(*held), "o-", color="tab:red", label="held-out loss")
    ax.invert_xaxis()                          # density falls as the run goes on
    ax.set(xlabel="FFN density (fraction of neurons kept)", ylabel="loss (nats/token)",
           title="pruning: loss as FFN neurons are removed")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plt, path)


def plot_pretrain(run: RunFolder, path: Path) -> bool:
    rows = [r for r in run.logs.get("pretrain", []) if is_number(r.get("step"))]
    entropy = run.stages.get("pretrain", {}).get("result", {}).get("unigram_entropy")
    return bool(rows) and plot_losses(rows, path, entropy if is_number(entropy) else None,
                                      title="pretraining loss")


def plot_ppo(run: RunFolder, path: Path) -> bool:
    keys = ("step", "score", "kl", "vf_loss")
    rows = [r for r in run.logs.get("ppo", []) if all(is_number(r.get(k)) for k in keys)]
    return bool(rows) and draw_ppo(rows, path)


def plot_dno(run: RunFolder, path: Path) -> bool:
    rows = run.logs.get("dno")
    return bool(rows) and plot_winrates(rows, path, series=["vs_sft", "vs_prev", "vs_teacher"]) is not None


def plot_ltc(run: RunFolder, path: Path) -> bool:
    rows = [r for r in run.logs.get("ltc", []) if is_number(r.get("iteration"))]
    base = run.ltc_baseline
    return bool(rows) and is_number(base.get("success")) and plot_curves(rows, base, path, "LTC")


DRAWERS = {"gains.png": plot_gains, "stages.png": plot_stages, "pretrain_loss.png": plot_pretrain,
           "post_losses.png": plot_post_losses, "ppo.png": plot_ppo, "dno_winrate.png": plot_dno,
           "ltc_curves.png": plot_ltc, "prune.png": plot_prune}   # PLOT_TEXT's names, report order


def write_plots(run: RunFolder, out: Path) -> list[str] | None:
    """Every plot whose data exist, as out/<name>; the names written, or None without matplotlib.

    A plot that fails on odd values becomes a line in run.problems, never a lost report."""
    if pyplot() is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    for old in PLOT_TEXT:                       # no stale figure from an earlier report survives
        (out / old).unlink(missing_ok=True)
    drawn = []
    for name, draw in DRAWERS.items():
        try:
            ok = draw(run, out / name)
        except Exception as e:  # noqa: BLE001 (odd values in a log must not cost the whole report)
            run.problems.append(f"`report/{name}`: not drawn ({type(e).__name__}: {e})")
            ok = False
        if ok:
            drawn.append(name)
    return drawn
