"""Win-rates: Wilson intervals against known values, ties as half, bootstrap, table and plot (lesson 09)."""

import pytest

from minilm.post.oracles import CyclicOracle
from minilm.post.winrate import (bootstrap_interval, head_to_head, plot_winrates, wilson_interval, win_rate,
                                 winrate_table)

pytestmark = pytest.mark.lesson_09


def test_wilson_interval_known_values():
    # p = 0.5, n = 10: centre stays 0.5, half-width 1.96/1.384 * sqrt(0.025 + 0.0096) = 0.2634
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)   # never a zero-width interval
    lo, hi = wilson_interval(800, 1000)
    assert lo < 0.8 < hi and hi - lo < 0.06
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_as_half():
    r = win_rate([1.0, 0.5, 0.0, 0.9, 0.2])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 2, 5)
    assert r["win_rate"] == pytest.approx(2.5 / 5)
    assert r["lo"] < 0.5 < r["hi"]
    assert win_rate([0.5] * 8)["win_rate"] == 0.5


def test_bootstrap_brackets_the_estimate():
    prefs = [1.0] * 60 + [0.0] * 40
    lo, hi = bootstrap_interval(prefs, n_boot=500)
    w_lo, w_hi = wilson_interval(60, 100)
    assert lo < 0.6 < hi and abs(lo - w_lo) < 0.05 and abs(hi - w_hi) < 0.05


def test_head_to_head_uses_the_oracle_and_checks_lengths():
    prefs = head_to_head(CyclicOracle(), ["q", "q"], ["paper", "rock"], ["rock", "paper"])
    assert prefs == [0.9, 0.1]
    with pytest.raises(ValueError, match="one reply from each side"):
        head_to_head(CyclicOracle(), ["q"], ["paper"], [])


def test_table_and_plot(tmp_path):
    rows = [{"name": "SFT", "vs_sft": None, "vs_teacher": win_rate([0, 1, 0]), "length": 2.0},
            {"name": "iter 1", "vs_sft": win_rate([1, 1, 0.5]), "vs_teacher": win_rate([1, 0]), "length": 3.5}]
    table = winrate_table(rows)
    assert table.splitlines()[0] == "|  | vs_sft | vs_teacher | length |"
    assert "| iter 1 | 0.833 [" in table and "| 3.500 |" in table
    pytest.importorskip("matplotlib")
    path = plot_winrates(rows, tmp_path / "w.png")
    assert path.exists() and path.stat().st_size > 1000
