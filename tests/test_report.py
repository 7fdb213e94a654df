"""The speedrun report: tables hold exactly the numbers of a hand-written run folder, partial and
broken runs still get a report, plots appear when matplotlib is there (lesson 12)."""

import json
import sys

import pytest

from minilm import MinilmError
from minilm.speedrun.report import write_report
from minilm.speedrun.stages import STAGES

ORDER = tuple(STAGES)  # the speedrun's stage order, which the report follows

pytestmark = pytest.mark.lesson_12


def _stage(root, name, title, seconds, tokens, params, trainable, result, plots=(), resumed=False):
    (root / name).mkdir(parents=True, exist_ok=True)
    record = {"stage": name, "title": title, "seconds": seconds, "tokens": tokens, "params": params,
              "trainable_params": trainable, "resumed": resumed, "checkpoint": f"{root}/{name}/checkpoint",
              "result": result, "plots": list(plots)}
    (root / name / "stage.json").write_text(json.dumps(record))


def _jsonl(path, rows, extra=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


def _suite(bpb, math_acc=None, end=None, form=None, correct=None, win=None, lo=None, hi=None, env=None,
           ladder=None, gain=(None, None, None)):
    return {"ladder_acc": ladder, "ladder_gain": gain[0], "ladder_gain_lo": gain[1], "ladder_gain_hi": gain[2],
            "bpb": bpb, "loss": 2.0, "math_acc": math_acc, "end_rate": end, "form_rate": form,
            "correct": correct, "winrate": win, "winrate_lo": lo, "winrate_hi": hi, "env_success_math": env,
            # sampled: 0.1 below the greedy win-rate, so that the table shows which column is which
            "winrate_sampled": win and win - 0.1, "winrate_sampled_lo": lo and lo - 0.1, "winrate_sampled_hi": hi and hi - 0.1}


@pytest.fixture
def run_dir(tmp_path):
    """A partial run: hydra-sft and ltc never ran, dpo/stage.json is corrupt, ppo's log has a bad line."""
    root = tmp_path / "speedrun-ci"
    _stage(root, "data", "data pipeline", 12.5, 0, 0, 0, {"phases": {"phase1": {"train": {"tokens": 90000}}},
                                                            "docs": 120, "shards": 4})
    _stage(root, "pretrain", "pretraining", 41.2, 123456, 1050000, 1050000,
           {"val_loss": 3.21, "val_bpb": 1.234567, "unigram_entropy": 5.5, "preset": "ci"},
           plots=["pretrain/loss.png"])
    _jsonl(root / "pretrain" / "metrics.jsonl",
           [{"step": s, "loss": 6.0 - s / 10, "phase": 1 if s < 30 else 2} for s in range(10, 50, 10)]
           + [{"step": 40, "loss": 2.0, "val_loss": 3.21, "phase": 2}])
    _stage(root, "sft", "chat SFT", 20.0, 50000, 1050000, 65536,
           {"after": {"correct_rate": 0.25}, "final_loss": 1.5})
    _jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)])
    (root / "dpo").mkdir()
    (root / "dpo" / "stage.json").write_text('{"stage": "dpo", "seconds": ')
    _stage(root, "ppo", "Hydra-PPO", 30.5, 0, 1100000, 70000, {"after": {"correct_rate": 0.3}, "final_kl": 0.125})
    _jsonl(root / "ppo" / "metrics.jsonl",
           [{"step": s, "score": 0.1 * s, "kl": 0.05 * s, "vf_loss": 1.0 / s} for s in (1, 2, 3)], "oops\n")
    win = {"win_rate": 0.6, "lo": 0.5, "hi": 0.7}
    _stage(root, "dno", "DNO", 60.0, 8000, 1050000, 1050000,
           {"best_iteration": 2, "rows": [{"name": "SFT", "vs_sft": None, "vs_prev": None, "vs_teacher": win},
                                          {"name": "iter 1", "vs_sft": win, "vs_prev": win, "vs_teacher": win},
                                          {"name": "iter 2", "vs_sft": {**win, "win_rate": 0.65},
                                           "vs_prev": win, "vs_teacher": win}]})
    _stage(root, "prune", "pruning", 15.0, 30000, 1050000, 1050000,
           {"before": {"heldout_loss": 2.0}, "after": {"heldout_loss": 2.5}, "compact": {"params": 800000}},
           resumed=True)
    _jsonl(root / "prune" / "metrics.jsonl",
           [{"step": s, "loss": 2.1, "density": 1 - s / 10, "task_loss": 2.1, "heldout_loss": 2.0 + s / 10}
            for s in (1, 3, 5)])
    _stage(root, "eval", "evaluation suite", 9.0, 0, 0, 0, {"evaluated": ["pretrain", "sft", "ppo"], "n": 3})
    (root / "eval.json").write_text(json.dumps({
        "sft": _suite(2.1, 0.1, 0.9, 0.8, 0.25, ladder=0.4), "pretrain": _suite(2.5, ladder=0.0),
        "ppo": _suite(1.9, 0.3, 0.95, 0.9, 0.3, 0.62, 0.55, 0.68, ladder=0.46, gain=(0.06, 0.01, 0.11))}))
    return root


@pytest.fixture
def text_only(monkeypatch):
    """No matplotlib (`import matplotlib` raises ImportError): the tables alone, and fast."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_tables_hold_exactly_the_run_numbers(run_dir, text_only):
    text = write_report(run_dir, ORDER).read_text()
    rows = _rows(text)
    assert "| data | data pipeline | 12.5 s | 0 | 0 | 0 | phase 1 train tokens 90,000 |" in rows
    assert "| eval | evaluation suite | 9.0 s | 0 | 0 | 0 | n 3 |" in rows     # no HEADLINES: numbers found
    assert ("| pretrain | pretraining | 41.2 s | 123,456 | 1,050,000 | 1,050,000 | "
            "val loss 3.21, val bpb 1.235 |") in rows
    assert "| sft | chat SFT | 20.0 s | 50,000 | 1,050,000 | 65,536 | correct 0.25, final loss 1.5 |" in rows
    assert "| ppo | Hydra-PPO | 30.5 s | 0 | 1,100,000 | 70,000 | correct 0.3, final KL 0.125 |" in rows
    assert "| dno | DNO | 60.0 s | 8,000 | 1,050,000 | 1,050,000 | best iteration 2, last vs SFT 0.65 |" in rows
    assert ("| prune | pruning | 15.0 s * | 30,000 | 1,050,000 | 1,050,000 | "
            "held-out loss 2.5, compact params 800,000 |") in rows
    # the ladder comes first: accuracy, the gain over SFT with its interval, "-" where not measured
    ladder = _rows(text.split("## What each stage bought")[1].split("##")[0])
    assert ladder[1:] == ["| pretrain | 0.000 | - |" + " - |" * 7, "| sft | 0.400 | - |" + " - |" * 7,
                          "| ppo | 0.460 | +0.060 [+0.010, +0.110] |" + " - |" * 7]
    assert text.index("## What each stage bought") < text.index("## Stages")
    # the other measurements: stage order (not the file's), None as "-", the win-rate with its interval
    evals = _rows(text.split("## The other measurements")[1].split("##")[0])
    assert evals[1:] == ["| pretrain | 2.500 | - | - | - | - | - | - | - | - | - |",
                         "| sft | 2.100 | 0.100 | 0.900 | 0.800 | 0.250 | - | - | - | - | - |",
                         "| ppo | 1.900 | 0.300 | 0.950 | 0.900 | 0.300 | 0.620 [0.55, 0.68] | 0.520 [0.45, 0.58] | - | - | - |"]
    assert "- preset: ci" in text
    assert "- total time: 188.2 s (3.1 min) over 7 of 10 stages; 211,456 tokens trained" in text
    assert "[pretrain/loss.png](pretrain/loss.png)" in text
    assert "\\* resumed after an interruption" in text


def test_partial_and_broken_runs_are_reported_not_fatal(run_dir, text_only):
    text = write_report(run_dir, ORDER).read_text()
    assert "Missing stages (not run, not finished or no readable stage.json): dpo, hydra-sft, ltc." in text
    problems = text.split("## Problems")[1]
    assert "`dpo/stage.json`: not readable JSON" in problems
    assert "`ppo/metrics.jsonl`: skipped 1 line(s) that are not JSON objects (first: line 4)" in problems
    assert "| dpo |" not in text
    # an empty folder: every stage missing, no evaluation, still a report
    empty = run_dir.parent / "empty"
    empty.mkdir()
    text = write_report(empty, ORDER).read_text()
    assert "over 0 of 10 stages" in text and "No evaluation results" in text
    assert "Missing stages (not run, not finished or no readable stage.json): data, pretrain," in text
    with pytest.raises(MinilmError, match="not a run folder"):
        write_report(run_dir.parent / "nowhere", ORDER)


def test_wrong_types_become_dashes_and_problems(run_dir, text_only):
    _stage(run_dir, "ltc", "LTC", "fast", None, 1000, 1000, ["not", "a", "dict"])
    (run_dir / "eval.json").write_text(json.dumps({"sft": [1, 2]}))
    text = write_report(run_dir, ORDER).read_text()
    assert "| ltc | LTC | - | - | 1,000 | 1,000 | - |" in _rows(text)
    assert "`ltc/stage.json`: seconds is 'fast', not a number" in text
    assert "`ltc/stage.json`: result is not an object" in text
    assert "`eval.json`: the entry 'sft' is not an object of metrics" in text


def test_plots_written_and_embedded(run_dir):
    pytest.importorskip("matplotlib")
    text = write_report(run_dir, ORDER).read_text()
    expected = ["gains.png", "stages.png", "pretrain_loss.png", "post_losses.png", "ppo.png", "dno_winrate.png", "prune.png"]
    for name in expected:
        assert (run_dir / "report" / name).stat().st_size > 1000, name
        assert f"![{name}](report/{name})" in text
    assert not (run_dir / "report" / "ltc_curves.png").exists()   # ltc never ran: no data, no plot


def test_text_only_without_matplotlib(run_dir, text_only):
    text = write_report(run_dir, ORDER).read_text()
    assert "matplotlib is not installed, so this report is text only" in text
    assert "![" not in text and not (run_dir / "report").exists()


def test_report_is_deterministic_apart_from_the_date(run_dir):
    def without_date(text):
        return [line for line in text.splitlines() if not line.startswith("- date: ")]
    first = write_report(run_dir, ORDER, title="ci run").read_text()
    second = write_report(run_dir, ORDER, title="ci run").read_text()
    assert first.startswith("# ci run\n")
    assert without_date(first) == without_date(second)
    assert len(without_date(first)) == len(first.splitlines()) - 1


def test_a_plot_that_fails_is_a_problem_line(run_dir):
    pytest.importorskip("matplotlib")
    _jsonl(run_dir / "pretrain" / "metrics.jsonl", [{"step": 1, "loss": {"not": "a number"}}])
    (run_dir / "sft" / "metrics.jsonl").unlink()
    (run_dir / "eval.json").unlink()
    text = write_report(run_dir, ORDER).read_text()
    assert "- `report/pretrain_loss.png`: not drawn (" in text
    assert "- `sft/metrics.jsonl`: missing" in text
    assert "- `eval.json`: missing" in text                  # the eval stage ran, so its output is expected
    assert "![stages.png]" not in text and "![ppo.png](report/ppo.png)" in text


def test_figures_say_what_they_show(run_dir, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from minilm.speedrun.report_plots import plot_post_losses, plot_pretrain, plot_stages
    from minilm.speedrun.run_folder import load_run
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)     # keep each figure to read it back
    run = load_run(run_dir, ORDER)
    out = run_dir / "figs"
    out.mkdir()
    assert plot_pretrain(run, out / "a.png") and plot_stages(run, out / "b.png")
    run.logs["dpo"] = [{"step": 1, "loss": 3.0, "chosen_nll": 2.3, "eval_loss": 0.69}]
    assert plot_post_losses(run, out / "c.png")
    pretrain, stages, post = figures
    assert pretrain.axes[0].get_title() == "pretraining loss"           # not the folder's name
    panels = {ax.get_title(): ax for ax in stages.axes if ax.get_visible()}
    rates = ["math_acc", "end_rate", "form_rate", "correct", "winrate", "winrate_sampled"]   # env_success_*: never
    assert list(panels) == ["bpb (lower is better)"] + [f"{r} (higher is better)" for r in rates]
    # one label per model in eval.json order (pretrain, sft, ppo): pretrain's math_acc was not measured
    labels = [t for t in panels["math_acc (higher is better)"].texts if t.get_text()]
    assert [t.get_text() for t in labels] == ["0.10", "0.30", "n/a"] and labels[2].get_position()[0] == 0
    assert panels["bpb (lower is better)"].get_ylim()[0] == 0
    dpo = post.axes[-1]
    assert dpo.get_title() == "dpo"
    assert [t.get_text() for t in dpo.get_legend().get_texts()] == ["train (DPO + SFT term)",
                                                                   "held-out (DPO loss only)"]
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_the_gains_figure_has_one_bar_per_stage_after_sft_with_its_interval(run_dir, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from minilm.speedrun.report_plots import plot_gains
    from minilm.speedrun.run_folder import load_run
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_gains(load_run(run_dir, ORDER), run_dir / "gains.png")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ppo"]          # SFT and pretrain have no gain
    from matplotlib.colors import to_rgba
    bar = ax.patches[0]
    assert bar.get_height() == pytest.approx(0.06)
    assert bar.get_facecolor() == pytest.approx(to_rgba("tab:green"))      # green: the interval clears 0
    monkeypatch.undo()
    plt.close(figures[0])
