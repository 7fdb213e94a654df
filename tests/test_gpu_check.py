"""scripts/gpu_check.sh: its GPU speedrun settings are valid, and its CPU-safe parts run here.

    pytest tests/test_gpu_check.py -q            # the settings (seconds)
    pytest -m slow tests/test_gpu_check.py -q    # the whole script without a GPU (~3 minutes)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minilm.speedrun import stages as table
from minilm.speedrun.run import parse_overrides, plan

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def gpu_speedrun_overrides() -> dict:
    """The --set arguments of the script's GPU speedrun, as `minilm speedrun` reads them."""
    text = SCRIPT.read_text()
    command = text[text.index("--preset gpu --out-dir"):text.index("else")]
    return parse_overrides(re.findall(r"--set (\S+)", command))


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_gpu_speedrun_settings_name_real_fields_and_shrink_every_stage(tmp_path):
    overrides = gpu_speedrun_overrides()
    assert {"pretrain", "sft", "dpo", "hydra-sft", "ppo", "dno", "ltc", "prune", "eval"} <= set(overrides)
    cfg = table.SpeedrunConfig(preset="gpu", out_dir=str(tmp_path), dry_run=True, overrides=overrides)
    configs = dict(plan(cfg))     # raises on an unknown field
    assert configs["pretrain"].max_steps == 400 and configs["sft"].max_steps == 300
    full = dict(plan(table.SpeedrunConfig(preset="gpu", out_dir=str(tmp_path), dry_run=True)))
    assert all(configs[s].max_steps < full[s].max_steps for s in ("pretrain", "sft", "dpo", "hydra-sft", "ppo", "prune"))


@pytest.mark.parametrize("name", ["ddp-2gpu", "fsdp-2gpu"])
def test_the_two_gpu_steps_are_commands_minilm_accepts(name, tmp_path):
    # what torchrun would start on each GPU, planned with --dry-run instead of trained
    text = SCRIPT.read_text().replace("\\\n", " ")
    args = re.search(rf"step {name} torchrun --nproc_per_node 2 (.*?) --out-dir", text).group(1).split()
    run = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "total per GPU" in run.stdout


@pytest.mark.slow
def test_without_a_gpu_the_script_runs_its_cpu_parts_and_writes_one_summary(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env={**os.environ, "NO_BUILD": "1"},
                         capture_output=True, text=True, timeout=1200)
    summary = (tmp_path / "summary.md").read_text()
    assert run.returncode == 0, summary
    for row in ("| environment | ok |", "| build | ok |", "| gpu-tests | skipped: no CUDA device |",
                "| speedrun | ok |", "| ddp-2gpu | skipped: fewer than 2 GPUs |",
                "| fsdp-2gpu | skipped: fewer than 2 GPUs |"):
        assert row in summary
    assert "kernels loaded:" in summary and (tmp_path / "speedrun" / "report.md").exists()
