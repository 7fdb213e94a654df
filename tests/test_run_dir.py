"""A rerun into a stage's out_dir continues only with the settings the run started with
(minilm/run_dir.py; lesson 00). Every stage checks before it loads anything."""

import json

import pytest

from minilm import MinilmError
from minilm.config import flatten, override
from minilm.run_dir import check_settings, differences
from minilm.speedrun.run import run_speedrun
from minilm.speedrun.stages import SpeedrunConfig
from minilm.stages import dno, dpo, hydra_sft, ltc, ppo, pretrain, prune, reward, sft

# stage -> (its config function, its run function, the name check_settings records)
STAGES = {
    "pretrain": (pretrain.train_config, pretrain.train, "pretrain"),
    "sft": (sft.sft_config, sft.run_sft, "sft"),
    "reward": (reward.reward_config, reward.run_reward, "reward"),
    "dpo": (dpo.dpo_config, dpo.run_dpo, "dpo"),
    "hydra-sft": (hydra_sft.hydra_sft_config, hydra_sft.run_hydra_sft, "hydra-sft"),
    "ppo": (ppo.ppo_config, ppo.run_ppo, "ppo"),
    "dno": (dno.dno_config, dno.run_dno, "dno"),
    "ltc": (ltc.ltc_config, ltc.run_ltc, "ltc"),
    "prune": (prune.prune_config, prune.run_prune, "prune"),
}


def started_run(out, cfg, stage):
    """`out` as a run of `stage` with settings `cfg` left it: settings.json and a checkpoint's train state."""
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "train_state.pt").write_bytes(b"")
    (out / "settings.json").write_text(json.dumps({"stage": stage, "config": flatten(cfg)}, default=str))


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_refuses_to_continue_with_another_lr_before_loading_anything(name, tmp_path):
    make, run, stage = STAGES[name]
    out = tmp_path / "out"
    cfg = make("tiny", out_dir=str(out), init=str(tmp_path / "missing"), device="cpu") if name != "pretrain" \
        else make("tiny", out_dir=str(out), data_dir=str(tmp_path / "missing"), device="cpu")
    started_run(out, cfg, stage)
    with pytest.raises(MinilmError, match=r"other settings: lr .* -> .*--out-dir NEW.*--no-resume"):
        run(override(cfg, lr=cfg.optim.lr * 2))    # the init does not exist: the check came first


def test_more_steps_continue_fewer_steps_and_other_fields_do_not():
    saved = flatten(sft.sft_config("tiny", max_steps=100))
    saved = json.loads(json.dumps(saved))
    assert differences(saved, flatten(sft.sft_config("tiny", max_steps=200, device="cpu", log_every=1))) == []
    assert differences(saved, flatten(sft.sft_config("tiny", max_steps=50))) == [
        "max_steps 100 -> 50 (it may only grow)"]
    assert differences(saved, flatten(sft.sft_config("tiny", max_steps=100, lora_r=8))) == ["lora_r 0 -> 8"]


def test_no_resume_starts_over_and_records_the_new_settings(tmp_path):
    cfg = sft.sft_config("tiny", out_dir=str(tmp_path))
    started_run(tmp_path, cfg, "sft")
    fresh = override(cfg, lr=1.0, resume=False)
    check_settings(fresh, "sft")
    assert json.loads((tmp_path / "settings.json").read_text())["config"]["lr"] == 1.0


def test_another_stages_folder_and_the_init_folder_are_refused(tmp_path):
    cfg = dpo.dpo_config("tiny", out_dir=str(tmp_path / "sft"))
    started_run(tmp_path / "sft", sft.sft_config("tiny"), "sft")
    with pytest.raises(MinilmError, match="holds a sft run, not a dpo run"):
        check_settings(cfg, "dpo")
    own = dpo.dpo_config("tiny", out_dir=str(tmp_path / "x"), init=str(tmp_path / "x" / "checkpoint"))
    with pytest.raises(MinilmError, match="would overwrite the checkpoint it starts from"):
        check_settings(own, "dpo")


def test_a_speedrun_refuses_a_folder_of_another_preset_or_other_set_values(tmp_path, monkeypatch):
    from minilm.speedrun import run as driver
    from minilm.speedrun import stages as table

    def execute(run, cfg):
        return {}, None
    fake = {n: table.Stage(n, s.needs, lambda run: {}, execute) for n, s in table.STAGES.items()}
    monkeypatch.setattr(driver, "STAGES", fake)
    run_speedrun(SpeedrunConfig(preset="ci", out_dir=str(tmp_path)))
    with pytest.raises(MinilmError, match="holds a --preset ci speedrun, not laptop"):
        run_speedrun(SpeedrunConfig(preset="laptop", out_dir=str(tmp_path)))
    with pytest.raises(MinilmError, match="sft finished with other --set values.*--only sft"):
        run_speedrun(SpeedrunConfig(preset="ci", out_dir=str(tmp_path), overrides={"sft": {"max_steps": 3}}))
    run_speedrun(SpeedrunConfig(preset="ci", out_dir=str(tmp_path), only="sft", overrides={"sft": {"max_steps": 3}}))
