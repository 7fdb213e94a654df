"""Stage configs by composition: nested OptimConfig / LoRAConfig / SampleConfig set by flat names,
flags generated from them, --help kept short, --set for every other field (minilm/config.py, cli.py).

    pytest tests/test_configs.py -q
"""

import dataclasses
import re

import pytest

from minilm.cli import STAGE_COMMANDS, STAGE_FLAGS, build_parser, main
from minilm.config import build, flat_fields, flatten, override
from minilm.generate import SampleConfig
from minilm.loop import OptimConfig
from minilm.post.base_model import LoRAConfig
from minilm.stages.dno import DNOConfig
from minilm.stages.pretrain import TrainConfig
from minilm.stages.prune import PruneConfig
from minilm.stages.sft import SFTConfig, sft_config


def test_flat_names_reach_the_nested_configs_and_keep_the_stage_defaults():
    cfg = build(SFTConfig, lr=1e-4, lora_r=8, max_steps=7)
    assert cfg.optim == OptimConfig(lr=1e-4, warmup_steps=20)       # SFT's own warmup survives
    assert cfg.lora == LoRAConfig(r=8) and cfg.max_steps == 7
    assert SFTConfig().optim.lr == 3e-3 and DNOConfig().sample == SampleConfig(80, 0.7, 0.95)


def test_flatten_and_build_are_inverse_and_override_copies():
    cfg = sft_config("ci", lr=5e-4, lora_alpha=4.0)
    assert build(SFTConfig, **flatten(cfg)) == cfg
    other = override(cfg, lora_r=2)
    assert other.lora.r == 2 and cfg.lora.r == 0 and other.optim is not cfg.optim


def test_an_unknown_field_names_the_fields():
    with pytest.raises(TypeError, match=r"SFTConfig has no field 'lora_rank'.*lora_r"):
        build(SFTConfig, lora_rank=8)


def test_no_config_inherits_fields_it_does_not_use():
    """Composition, not a 20-field base: pruning fine-tunes every weight, so it has no LoRA at all."""
    assert not any(name.startswith("lora_") for name, _ in flat_fields(PruneConfig))
    from minilm.config import Validated
    assert not dataclasses.is_dataclass(Validated)        # the one base: checks values, adds no field
    for cmd in STAGE_COMMANDS.values():
        assert cmd.cls.__bases__ == (Validated,), cmd.cls


@pytest.mark.parametrize("stage", ["train", *STAGE_COMMANDS])
def test_help_lists_at_most_25_flags_and_every_field_still_has_one(stage):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[stage]
    shown = re.findall(r"^\s+(--[a-z-]+)", sub.format_help(), re.M)
    shown = [f for f in shown if f != "--help"]
    assert len(shown) <= 25, shown
    cls = TrainConfig if stage == "train" else STAGE_COMMANDS[stage].cls
    accepted = {a.dest for a in sub._actions}
    missing = [n for n, f in flat_fields(cls) if n not in accepted and n not in ("model", "preset")
               and not dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None)]
    assert not missing  # hidden from --help, still a flag: old commands keep working


def test_help_says_what_a_flag_means_from_the_fields_comment():
    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices["sft"].format_help()
    assert "weight of the clean-text loss" in " ".join(text.split())      # SFTConfig.text_mix's comment
    assert "scaled by alpha / r" in " ".join(text.split())               # LoRAConfig.alpha's, as --lora-alpha


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_the_main_flags_name_real_fields(stage):
    names = {n for n, _ in flat_fields(STAGE_COMMANDS[stage].cls)}
    assert set(STAGE_FLAGS[stage]) <= names


def test_set_and_flags_reach_the_config(capsys):
    assert main(["dno", "--lr", "2e-4", "--set", "n_val=7", "--set", "lora_r=4", "--set", "top_p=0.5",
                 "--set", "large_margin=false", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in ("lr=0.0002", "n_val=7", "LoRAConfig(r=4", "top_p=0.5", "large_margin=False"):
        assert part in out


@pytest.mark.parametrize("argv, words", [
    (["sft", "--set", "lora_rank=8"], "lora_r"),                  # the message lists the real fields
    (["sft", "--set", "max_steps=ten"], "max_steps takes int"),
    (["ppo", "--set", "whiten_advantages=maybe"], "takes bool"),
    (["sft", "--set", "no-equals-sign"], "FIELD=VALUE"),
])
def test_a_bad_set_is_one_clear_error(capsys, argv, words):
    assert main(argv + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_train_without_data_is_a_clear_error(tmp_path):
    from minilm import MinilmError
    from minilm.stages.pretrain import train
    with pytest.raises(MinilmError, match="no training data"):
        train(build(TrainConfig, out_dir=str(tmp_path), device="cpu"))


def test_minilm_train_resolves_the_default_data_without_building_it_in_a_dry_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data_dir='runs/data/pinned-2048/phase1'" in out and not (tmp_path / "runs").exists()


BAD_VALUES = [("batch_size", 0), ("max_steps", -5), ("grad_accum", 0), ("eval_every", 0), ("ckpt_every", 0),
              ("log_every", 0), ("lr", float("nan")), ("lr", -1.0), ("grad_clip", 0.0), ("warmup_steps", -1),
              ("betas", (0.9, 2.0)), ("min_lr_ratio", 1.5)]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_every_stage_config_refuses_a_bad_value_when_it_is_made(field, value):
    """One rule table (minilm/config.py RULES) for the CLI, the speedrun and the Python API alike."""
    from minilm.config import ConfigError
    from minilm.stages.pretrain import train_config
    from minilm.stages.sft import sft_config
    from minilm.stages.pretrain import TrainConfig
    from minilm.stages.sft import SFTConfig
    makers = [make for make, cls in ((train_config, TrainConfig), (sft_config, SFTConfig))
              if field in dict(flat_fields(cls))]
    assert makers
    for make in makers:
        with pytest.raises(ConfigError, match=f"{field} must be"):
            make("tiny", **{field: value})


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    assert main(["train", "--batch-size", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minilm train: error: batch_size must be a positive integer, got 0"]
