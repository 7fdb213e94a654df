"""Pretraining alone, whole (`minilm train --preset tiny`): build the two-phase data, train `tiny`, beat the unigram entropy (slow, ~6 min)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.lesson_03]
REPO = Path(__file__).resolve().parents[1]


def test_tiny_preset_learns_far_below_the_unigram_entropy(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minilm", "train", "--preset", "tiny"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's minilm
    assert result.returncode == 0, result.stderr[-2000:]
    data = tmp_path / "runs/data/pinned-2048"
    assert (data / "manifest.json").exists() and (data / "phase2/meta.json").exists()
    entropy = json.loads((data / "phase1/meta.json").read_text())["splits"]["train"]["unigram_entropy"]
    rows = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val_loss" in r][-1]
    assert final["step"] == 1600
    assert [r["phase"] for r in rows if r["step"] in (800, 810)] == [1, 2]   # the last 800 steps: phase 2
    # a model that learned only token frequencies would sit at the unigram entropy
    assert final["val_loss"] < entropy - 1.5
    assert "--- 'Return the' ->" in result.stdout  # samples were printed
