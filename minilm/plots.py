"""The PNG plots the training stages draw as they go, and `pyplot()`, the one import of matplotlib.

    plot_losses(metrics_rows, Path("runs/tiny/loss.png"), baseline=unigram_entropy)   # any loop
    plot_ppo(ppo_rows, Path("runs/ppo-tiny/ppo.png"))            # reward, KL, value loss per step
    plot_curves(ltc_rows, il_baseline, Path("runs/ltc/curves.png"), "LTC math")   # per iteration
    plt = pyplot()                                               # None without matplotlib

Each function returns whether it drew (False when matplotlib is missing), so a run never fails for
want of a figure. The speedrun's report (minilm/speedrun/report_plots.py) redraws some of them.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:   # the one place matplotlib is imported: drawing is optional, training is not
        import matplotlib
        matplotlib.use("Agg")            # file-only backend: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: Path, dpi: int = 110) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return True


def plot_losses(metrics: list[dict], path: Path, baseline: float | None = None,
                title: str | None = None) -> bool:
    """Write the loss curve as PNG if matplotlib is installed; returns whether it did.

    `baseline` (the unigram entropy of the data) is drawn as a dashed line: the loss to beat.
    `title` defaults to the name of the folder the PNG goes into (the run's out_dir).
    """
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="gray", label="unigram entropy")
    phase2 = [m["step"] for m in metrics if m.get("phase") == 2]   # pretraining's switch to phase-2 data
    if phase2:
        ax.axvline(phase2[0], linestyle=":", color="black", label="phase 2 starts")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title or path.parent.name)
    ax.legend()
    return save(fig, path, dpi=120)


def plot_ppo(metrics: list[dict], path) -> bool:
    """reward, KL and value loss against the PPO step, as PNG (if matplotlib is installed)."""
    plt = pyplot()
    if plt is None:
        return False
    titles = {"score": "reward (score)", "kl": "KL to the reference (nats/reply)", "vf_loss": "value loss"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, titles.items()):
        ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker=".")
        ax.set(xlabel="PPO step (rollout batch)", title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    return save(fig, path)


def plot_curves(rows: list[dict], baseline: dict, path: Path, title: str) -> bool:
    """PNG: held-out success/score and exploration success per iteration (left), losses (right)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    its = [r["iteration"] for r in rows]
    for key, label in (("test_success", "held-out success"), ("test_score", "held-out score (F1)"),
                       ("explore_success", "exploration success")):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(baseline["success"], linestyle="--", color="gray", label="IL baseline (held-out)")
    ax.set(xlabel="iteration", ylabel="rate", title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    for key in ("lm_loss", "pg_loss", "vf_loss"):
        if any(key in r for r in rows):
            bx.plot(its, [r.get(key, float("nan")) for r in rows], marker=".", label=key)
    bx.set(xlabel="iteration", ylabel="loss", title="update losses (mean per iteration)")
    bx.legend(fontsize=8)
    return save(fig, path)
