"""Plots minilm draws as PNG files: training-loss curves (more in each stage and the report).

    plot_losses(metrics_rows, Path("runs/tiny/loss.png"), baseline=unigram_entropy)
"""

from __future__ import annotations

from pathlib import Path


def plot_losses(metrics: list[dict], path: Path, baseline: float | None = None,
                title: str | None = None) -> bool:
    """Write the loss curve as PNG if matplotlib is installed; returns whether it did.

    `baseline` (the unigram entropy of the data) is drawn as a dashed line: the loss to beat.
    `title` defaults to the name of the folder the PNG goes into (the run's out_dir).
    """
    try:   # optional: matplotlib is only needed to draw
        import matplotlib
        matplotlib.use("Agg")            # file-only backend: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
