"""Win-rates with confidence intervals, and the length next to them (DNO's evaluation; lesson 09).

    from minilm.post.winrate import win_rate, head_to_head, winrate_table, plot_winrates
    prefs = head_to_head(oracle, prompts, replies_new, replies_old)   # P(new beats old) per prompt
    row = win_rate(prefs)          # {"win_rate", "lo", "hi", "wins", "ties", "losses", "n"}
    print(winrate_table(rows))     # markdown
    plot_winrates(rows, "runs/dno/winrate.png")

win-rate = (wins + ties / 2) / n, with P(a beats b) taken as a win when > 0.5 and a tie when
exactly 0.5 (a soft oracle's probabilities are thresholded, as AlpacaEval's judge is read).
The interval: Wilson's score interval for a binomial proportion at z (default 95%), applied to
the tie-as-half count; with many ties it is slightly too wide (ties have less variance than a
coin flip), so `bootstrap_interval` gives the percentile bootstrap over prompts as a check.
`paired_gain` is the same bootstrap for a difference of accuracies on shared items (the report's
"gain over SFT").
Length: AlpacaEval 2's lesson is that judges favour longer answers, so every table shows the
mean reply length of both sides beside the win-rate (DNO's replies doubled in length).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from minilm.plots import pyplot


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for successes out of n (successes may be fractional)."""
    if n <= 0:
        raise ValueError(f"a win-rate needs at least one comparison, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    # the score interval: centre pulled towards 1/2, half-width that stays > 0 at p = 0 or 1
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def outcomes(prefs) -> list[float]:
    """1 (win), 0.5 (tie), 0 (loss) for each P(a beats b)."""
    return [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in prefs]


def bootstrap_interval(prefs, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the win-rate, resampling prompts."""
    scores = outcomes(prefs)
    if not scores:
        raise ValueError("a win-rate needs at least one comparison")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(n_boot))
    cut = int((1 - level) / 2 * n_boot)      # drop this many means from each tail
    return means[cut], means[n_boot - 1 - cut]


def paired_gain(mine, base, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean(mine) - mean(base), lo, hi): the percentile bootstrap over ITEMS, both models resampled
    together. Pairing matters: two models that fail the same hard items differ far less from run
    to run than two independent accuracies do, so the paired interval is the narrower, honest one."""
    if len(mine) != len(base) or not mine:
        raise ValueError(f"a paired gain needs equal, non-empty score lists, got {len(mine)} and {len(base)}")
    diffs = [float(a) - float(b) for a, b in zip(mine, base)]   # one difference per item
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(n_boot))
    cut = int((1 - level) / 2 * n_boot)
    return sum(diffs) / n, means[cut], means[n_boot - 1 - cut]


def win_rate(prefs, z: float = 1.96) -> dict:
    """{"win_rate", "lo", "hi", "wins", "ties", "losses", "n"}: ties count half, Wilson interval."""
    scores = outcomes(prefs)
    n = len(scores)
    wins, ties = scores.count(1.0), scores.count(0.5)
    lo, hi = wilson_interval(wins + 0.5 * ties, n, z)
    return {"win_rate": (wins + 0.5 * ties) / n, "lo": lo, "hi": hi, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n}


def head_to_head(oracle, prompts, replies_a, replies_b) -> list[float]:
    """P(a beats b) per prompt from `oracle.prefer_many` (or `prefer`), same prompts in order."""
    if not len(prompts) == len(replies_a) == len(replies_b):
        raise ValueError(f"{len(prompts)} prompts, {len(replies_a)} and {len(replies_b)} replies: "
                         f"a head-to-head needs one reply from each side per prompt")
    triples = list(zip(prompts, replies_a, replies_b))
    if hasattr(oracle, "prefer_many"):
        return oracle.prefer_many(triples)
    return [oracle.prefer(p, a, b) for p, a, b in triples]


def winrate_table(rows: list[dict], columns=None) -> str:
    """A markdown table; each row: {"name", <column>: win_rate dict or number, ...}.

    A win_rate dict prints as "0.62 [0.55, 0.68]"; numbers (e.g. mean length) print as they are.
    """
    if not rows:
        raise ValueError("no rows to tabulate")
    columns = columns or [k for k in rows[0] if k != "name"]
    lines = ["| " + " | ".join(["", *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join([str(row.get("name", "")), *cells]) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, dict) and "win_rate" in value:
        return f"{value['win_rate']:.3f} [{value['lo']:.2f}, {value['hi']:.2f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def plot_winrates(rows: list[dict], path, series=None, length_key: str | None = "length") -> Path | None:
    """Win-rate curves with interval bands over rows (iterations), mean length on a second axis.

    series: the win-rate columns to draw (default: every column holding win_rate dicts).
    Returns the path, or None when matplotlib is missing.
    """
    plt = pyplot()
    if plt is None:
        return None
    series = series or [k for k in rows[0] if isinstance(rows[0][k], dict) and "win_rate" in rows[0][k]]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in series:
        pts = [(i, r[key]) for i, r in zip(x, rows) if isinstance(r.get(key), dict)]
        xs = [i for i, _ in pts]
        ax.plot(xs, [w["win_rate"] for _, w in pts], marker="o", label=key)
        ax.fill_between(xs, [w["lo"] for _, w in pts], [w["hi"] for _, w in pts], alpha=0.2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [str(r.get("name", i)) for i, r in zip(x, rows)])
    ax.set_ylabel("win-rate (ties = 1/2), 95% Wilson")
    ax.set_ylim(0, 1)
    if length_key and all(length_key in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r[length_key] for r in rows], color="black", ls=":", marker="s", label="mean length")
        ax2.set_ylabel("mean reply length (tokens)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
