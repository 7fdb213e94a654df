"""The speedrun driver: stage order, skip-when-done, resume after a kill, --only, torchrun ranks,
and (slow) the whole `ci` preset from an empty folder to report.md."""

import json
import os
from pathlib import Path

import pytest

from minilm import MinilmError
from minilm.speedrun import run as sr
from minilm.speedrun import stages as table

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.lesson_12


def fake_stages(calls: list, fail_at: str | None = None) -> dict:
    """Stages that record their calls instead of training; `fail_at` raises like a Ctrl-C."""
    def make(name):
        def execute(run, cfg):
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt
            run.dir(name).mkdir(parents=True, exist_ok=True)
            (run.dir(name) / "out.txt").write_text(cfg)
            return {"value": len(calls)}, None
        return table.Stage(name, tuple(sr.STAGES[name].needs), lambda run: f"config of {name}", execute)
    return {name: make(name) for name in sr.STAGES}


def test_bad_preset_and_stage_names_are_clear_errors():
    with pytest.raises(MinilmError, match="unknown speedrun preset 'fast'.*ci, laptop, gpu"):
        table.SpeedrunConfig(preset="fast")
    with pytest.raises(MinilmError, match="unknown stage.*pretrian"):
        table.SpeedrunConfig(preset="ci", only="data,pretrian")


def test_runs_every_stage_in_order_then_skips_finished_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "STAGES", fake_stages(calls))
    cfg = table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path))
    records = sr.run_speedrun(cfg)
    assert calls == list(sr.STAGES) and list(records) == list(sr.STAGES)
    rec = json.loads((tmp_path / "sft" / "stage.json").read_text())
    assert rec["stage"] == "sft" and rec["result"] == {"value": 3} and rec["resumed"] is False
    assert rec["seconds"] >= 0 and rec["checkpoint"] is None
    calls.clear()
    assert sr.run_speedrun(cfg) == records and calls == []  # everything finished: nothing runs


def test_a_killed_run_continues_at_the_stage_it_was_in(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "STAGES", fake_stages(calls, fail_at="dpo"))
    cfg = table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        sr.run_speedrun(cfg)
    assert calls == ["data", "pretrain", "sft", "dpo"] and not (tmp_path / "dpo" / "stage.json").exists()
    calls.clear()
    monkeypatch.setattr(sr, "STAGES", fake_stages(calls))
    sr.run_speedrun(cfg)
    assert calls == list(sr.STAGES)[3:]  # data, pretrain, sft are not run again


def test_only_reruns_a_stage_from_scratch_and_keeps_the_old_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "STAGES", fake_stages(calls))
    sr.run_speedrun(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path)))
    (tmp_path / "sft" / "mine.txt").write_text("keep me")
    calls.clear()
    sr.run_speedrun(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path), only="sft,report"))
    assert calls == ["sft", "report"]
    assert (tmp_path / "sft.prev" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "sft" / "stage.json").exists() and not (tmp_path / "sft" / "mine.txt").exists()


def test_only_without_its_prerequisites_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "STAGES", fake_stages([]))
    with pytest.raises(MinilmError, match="'dpo' needs sft, which has not finished.*minilm speedrun --preset ci"):
        sr.run_speedrun(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path), only="dpo"))


def test_under_torchrun_other_ranks_join_pretraining_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "STAGES", fake_stages(calls))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stage.json").write_text("{}")  # rank 0 finished the data
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sr.run_speedrun(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path)))
    assert calls == ["pretrain"] and not (tmp_path / "pretrain" / "stage.json").exists()


def test_other_ranks_ignore_a_data_record_older_than_the_run(tmp_path):
    import threading
    import time
    record = tmp_path / "stage.json"
    record.write_text("{}")  # a previous run's record, which --only data will set aside
    started = time.time() + 0.01
    threading.Timer(0.3, lambda: record.write_text('{"new": 1}')).start()
    sr._wait_for(record, newer_than=started, poll_s=0.02)
    assert record.read_text() == '{"new": 1}'


def test_rank0_runs_post_training_as_a_single_process(tmp_path, monkeypatch):
    seen = {}
    stages = fake_stages([])

    def execute(run, cfg):
        seen["world"] = os.environ.get("WORLD_SIZE")
        return {}, None
    stages["sft"] = table.Stage("sft", ("pretrain",), lambda run: "", execute)
    monkeypatch.setattr(sr, "STAGES", stages)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sr.run_speedrun(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path)))
    assert seen["world"] is None and os.environ["WORLD_SIZE"] == "2"  # hidden during sft only


@pytest.mark.parametrize("preset", list(table.SPEEDRUN_PRESETS))
def test_every_preset_plans_valid_stage_configs(tmp_path, preset):
    plan = dict(sr.plan(table.SpeedrunConfig(preset=preset, out_dir=str(tmp_path))))
    assert list(plan) == list(sr.STAGES)
    assert plan["sft"].init == str(tmp_path / "pretrain" / "checkpoint")
    assert plan["ppo"].init == str(tmp_path / "hydra-sft" / "checkpoint") and plan["ppo"].variant == "hydra"
    assert plan["ltc"].env == "math" and plan["prune"].method == "gum"
    assert all(getattr(c, "out_dir", str(tmp_path / n)).startswith(str(tmp_path))
               for n, c in plan.items() if n not in ("data", "eval", "report"))


def test_overrides_reach_the_stage_config(tmp_path):
    cfg = table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path), overrides={"sft": {"max_steps": 7}})
    assert dict(sr.plan(cfg))["sft"].max_steps == 7


@pytest.mark.slow
def test_ci_preset_from_nothing_to_a_report(tmp_path):
    cfg = table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path / "run"), device="cpu")
    records = sr.run_speedrun(cfg)
    assert list(records) == list(sr.STAGES)
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(rows) == set(table.EVALUATED)
    assert rows["sft"]["winrate"] == pytest.approx(0.5)  # the SFT model against itself
    assert rows["pretrain"]["bpb"] > 0 and rows["sft"]["end_rate"] >= rows["pretrain"]["end_rate"]
    assert records["prune"]["params"] < records["sft"]["params"]  # the compacted model is smaller
    assert records["ppo"]["trainable_params"] < records["ppo"]["params"]  # Hydra-PPO trains LoRA only
    assert records["pretrain"]["tokens"] == 120 * 8 * 256
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(name in report for name in sr.STAGES if name not in ("eval", "report"))


@pytest.mark.slow
def test_under_torchrun_pretraining_is_data_parallel_and_sft_runs_on_rank0(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minilm", "speedrun",
           "--preset", "ci", "--out-dir", str(out), "--only", "data,pretrain,sft", "--device", "cpu",
           "--set", "pretrain.max_steps=20", "--set", "pretrain.eval_every=10", "--set", "sft.max_steps=5",
           "--set", "sft.eval_every=5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DDP over 2 processes" in done.stderr + done.stdout
    assert json.loads((out / "pretrain" / "stage.json").read_text())["tokens"] == 20 * 2 * 8 * 256
    # recorded relative to the run folder, so a moved run still finds it
    assert json.loads((out / "sft" / "stage.json").read_text())["checkpoint"] == "sft/checkpoint"
    assert (out / "sft" / "checkpoint").is_dir()
