"""The quoted speedrun numbers are checked against a run (lessons/quoted_numbers.py); the slow test makes
that run from nothing, as a reader would, and checks every number README.md and lessons 03 and 12 quote."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lessons"))
import quoted_numbers as quoted  # lessons/quoted_numbers.py

pytestmark = pytest.mark.lesson_12

TABLE = """Some prose.

| model after | ladder acc | gain over SFT [95%] | ops1 |
|---|---:|---:|---:|
| sft | 0.307 | - | 0.46 |
| dno (best iterate: 1) | 0.327 | **+0.020 [-0.030, +0.067]** | 0.54 |

| other table | 0.999 |
"""
RESULTS = {"sft": {"ladder_acc": 0.30667, "ladder_ops1": 0.46},
           "dno": {"ladder_acc": 0.32667, "ladder_ops1": 0.54, "ladder_gain": 0.02, "ladder_gain_lo": -0.03,
                   "ladder_gain_hi": 0.06667}}


def test_quoted_tables_are_read_by_their_headers_and_checked_as_rounded(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(TABLE)
    assert quoted.check(page, RESULTS, tol=0.0) == (7, [])       # 2 + 5 numbers; "-" and other tables skipped
    page.write_text(TABLE.replace("0.327", "0.330"))
    _, errors = quoted.check(page, RESULTS, tol=0.0)
    assert errors == [f"{page}:6: dno / ladder acc: quoted 0.330, the run has 0.3267 (ladder_acc)"]
    assert quoted.check(page, RESULTS, tol=0.005)[1] == []           # within the stated tolerance


def test_a_model_or_a_number_the_run_lacks_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(TABLE.replace("| sft |", "| ppo |"))
    assert quoted.check(page, RESULTS, tol=0.0)[1] == [f"{page}:5: model 'ppo' is not in the run's eval.json"]
    page.write_text(TABLE.replace("+0.020 [-0.030, +0.067]", "+0.020"))
    assert "does not read as 3 number(s)" in quoted.check(page, RESULTS, tol=0.0)[1][0]


CURVE = """| step | phase | train loss | val loss | val bits/byte |
|---|---|---|---|---|
| 400 | 1 | 4.24 | 4.24 | 1.88 |
| 800 | 2 | 4.02 | **3.86** | 1.71 |
"""
METRICS = [{"step": 390, "loss": 4.3, "phase": 1},                  # not evaluated: not a quotable row
           {"step": 400, "loss": 4.2449, "phase": 1, "val_loss": 4.2410, "val_bpb": 1.8751},
           {"step": 800, "loss": 4.0161, "phase": 2, "val_loss": 3.8648, "val_bpb": 1.7123}]


def test_the_pretraining_curve_is_read_by_step_from_metrics_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in METRICS))
    rows = quoted.load(tmp_path / "metrics.jsonl")
    assert list(rows) == ["400", "800"]
    page = tmp_path / "page.md"
    page.write_text(CURVE)
    assert quoted.check(page, rows, 0.0, "| step | phase |") == (8, [])     # phase is checked as an integer
    page.write_text(CURVE.replace("| 800 | 2 |", "| 800 | 1 |").replace("| 400 |", "| 1200 |"))
    assert quoted.check(page, rows, 0.0, "| step | phase |")[1] == [
        f"{page}:3: step '1200' is not in the run's pretrain/metrics.jsonl",
        f"{page}:4: 800 / phase: quoted 1, the run has 2.0000 (phase)"]


def test_the_command_exits_2_without_a_run_and_1_on_a_mismatch(tmp_path, capsys):
    assert quoted.main([str(tmp_path)]) == 2
    assert "eval.json not found" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text(json.dumps(RESULTS))
    assert quoted.main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in METRICS))
    page = tmp_path / "page.md"
    page.write_text(TABLE)
    assert quoted.main([str(tmp_path), str(page)]) == 0
    page.write_text(TABLE.replace("0.46", "0.50"))
    assert quoted.main([str(tmp_path), str(page)]) == 1


@pytest.mark.slow
def test_a_fresh_laptop_speedrun_gives_every_number_the_readme_and_lessons_03_and_12_quote(tmp_path):
    """~20 minutes on 2 cores: the README's main command, then the check at the rounding printed."""
    from minilm.speedrun import run as sr
    from minilm.speedrun import stages as table
    sr.run_speedrun(table.SpeedrunConfig(preset="laptop", out_dir=str(tmp_path / "run")))
    assert quoted.main([str(tmp_path / "run")]) == 0
