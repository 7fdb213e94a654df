"""The command line: `minilm <stage> [--flags]` (also `python -m minilm ...`, and under torchrun).

    minilm speedrun --preset laptop             # every stage, data to report (--preset ci: minutes)
    minilm train --preset tiny                  # build the data (phases 1 and 2), pretrain, sample
    minilm data --out runs/data/pipeline --workers 2          # the data pipeline alone
    minilm train --preset tiny --max-steps 50 --n-layer 2 --out-dir runs/quick
    minilm sft --init runs/tiny/checkpoint --out-dir runs/sft-tiny  # chat SFT (--lora-r 8: LoRA)
    minilm reward --init runs/sft-tiny/checkpoint   # reward model (--lm-weight 1: Hydra-SFT)
    minilm dpo --init runs/sft-tiny/checkpoint      # DPO (--lora-r 8: reference = LoRA off)
    minilm dno --init runs/sft-tiny/checkpoint --iterations 3 --samples 5 --oracle verifier
    minilm hydra-sft --init runs/sft-tiny/checkpoint    # one model: LM head + reward head
    minilm prune --init runs/sft-tiny/checkpoint --method gum --sparsity 0.5 --out-dir runs/prune-gum
    minilm ppo --variant hydra --init runs/hydra-sft-tiny/checkpoint   # PPO: ppo, lora, hydra, jhydra
    minilm ltc --env math --pattern analogue --init runs/sft-tiny/checkpoint --out-dir runs/ltc-math
    minilm dno --set n_val=50 --set replay=0.5,0.2 --dry-run   # any field; print the config and stop
    minilm generate runs/tiny/checkpoint --prompt "Return the" --max-new-tokens 40
    minilm chat runs/sft-tiny/checkpoint --system "Answer briefly."   # or: printf 'Hi\n' | minilm chat ...
    minilm serve runs/sft-tiny/checkpoint --run runs/speedrun-laptop    # OpenAI-style API + a chat page
    minilm export-hf runs/tiny/checkpoint runs/tiny-hf
    minilm import-hf ~/models/Phi-3-mini-4k-instruct runs/phi3-mini   # weights and tokenizer
    minilm presets

Each stage is a library function; this file turns flags into its dataclass (one flag per field,
`--max-steps` sets `max_steps`) and user errors into one message and exit code 2. `--help` lists a
stage's main fields (its FLAGS); every field has a flag, and `--set FIELD=VALUE` sets any of them.
The commands that use a finished checkpoint (generate, chat, serve, export-hf, import-hf) are in
minilm/cli_checkpoints.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_prep.pipeline import add_pipeline_args, config_from_args, run_pipeline
from data_prep.prepare import default_data, prepare_data
from minilm import MinilmError
from minilm.agents.patterns import PATTERNS
from minilm.checkpoint import load_checkpoint, read_config
from minilm.cli_checkpoints import COMMANDS as CHECKPOINT_COMMANDS, add_checkpoint_commands
from minilm.cli_flags import add_config_flags, parse_set, set_fields
from minilm.cli_results import (show_cyclic_demo, show_dno, show_dpo, show_hydra_sft, show_ltc, show_ppo,
                                show_prune, show_reward, show_sft)
from minilm.config import PRESETS, ConfigError, ModelConfig, get_preset
from minilm.memory import plan_for_stage, plan_memory
from minilm.generate import generate_text
from minilm.post.ppo_models import VARIANTS
from minilm.runtime import teardown_runtime
from minilm.speedrun.run import parse_overrides, plan, run_speedrun
from minilm.speedrun.stages import SPEEDRUN_PRESETS, SpeedrunConfig
from minilm.stages import dno, dpo, hydra_sft, ltc, ppo, pretrain, prune, reward, sft
from minilm.tokenizer import TokenizerError

SAMPLE_PROMPTS = ["Return the", "This module provides", "If the file"]
MODEL_FLAGS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len")


@dataclass(frozen=True)
class StageCommand:
    """A `minilm <stage>` subcommand: the stage module's config, presets, flags and run function, and
    `show(result)`, which prints the numbers a user wants to see at the end."""
    help: str
    cls: type
    make_config: Callable        # (preset, **fields) -> cls
    presets: dict
    run: Callable
    show: Callable[[dict], None]
    choices: dict = field(default_factory=dict)


STAGE_COMMANDS = {
    "sft": StageCommand("supervised fine-tuning on chat data (full or --lora-r N)", sft.SFTConfig,
                        sft.sft_config, sft.SFT_PRESETS, sft.run_sft, show_sft),
    "reward": StageCommand("reward model on preference pairs (Bradley-Terry; --lm-weight: Hydra-SFT)",
                           reward.RewardConfig, reward.reward_config, reward.REWARD_PRESETS, reward.run_reward,
                           show_reward),
    "dpo": StageCommand("direct preference optimization from an SFT checkpoint", dpo.DPOConfig, dpo.dpo_config,
                        dpo.DPO_PRESETS, dpo.run_dpo, show_dpo),
    "dno": StageCommand("Direct Nash Optimization, iterated (--oracle verifier|reward|judge|cyclic)", dno.DNOConfig,
                        dno.dno_config, dno.DNO_PRESETS, dno.run_dno, show_dno,
                        {"oracle": ["verifier", "reward", "judge", "cyclic"]}),
    "hydra-sft": StageCommand("Hydra-SFT: one model trained on SFT chats and preference pairs",
                              hydra_sft.HydraSFTConfig, hydra_sft.hydra_sft_config, hydra_sft.HYDRA_SFT_PRESETS,
                              hydra_sft.run_hydra_sft, show_hydra_sft),
    "ppo": StageCommand("PPO against a reward model: --variant ppo, lora, hydra or jhydra", ppo.PPOConfig,
                        ppo.ppo_config, ppo.PPO_PRESETS, ppo.run_ppo, show_ppo, {"variant": list(VARIANTS)}),
    "ltc": StageCommand("LTC: expert demos, then explore + LM/PPO updates (--env, --pattern)", ltc.LTCConfig,
                        ltc.ltc_config, ltc.LTC_PRESETS, ltc.run_ltc, show_ltc,
                        {"env": ["household", "qa", "math"], "pattern": list(PATTERNS), "loss": list(ltc.LOSSES)}),
    "prune": StageCommand("fine-tune while pruning FFN neurons: --method magnitude|random|movement|gum",
                          prune.PruneConfig, prune.prune_config, prune.PRUNE_PRESETS, prune.run_prune, show_prune),
}
STAGE_FLAGS = {"sft": sft.FLAGS, "reward": reward.FLAGS, "dpo": dpo.FLAGS, "dno": dno.FLAGS,
               "hydra-sft": hydra_sft.FLAGS, "ppo": ppo.FLAGS, "ltc": ltc.FLAGS, "prune": prune.FLAGS}


def cmd_stage(args) -> None:
    """Any post-training stage: its preset, the flags given, then --set; --dry-run prints the config."""
    stage = STAGE_COMMANDS[args.command]
    if args.command == "dno" and args.oracle == "cyclic":  # no model: the tabular demo
        return show_cyclic_demo(args.iterations or 300)
    # the preset, then the flags given, then --set: a later source overrides an earlier one
    cfg = stage.make_config(args.preset, **{**set_fields(args, stage.cls), **parse_set(args.set, stage.cls)})
    if args.dry_run:
        print(cfg)
        if Path(cfg.init).is_dir():   # the plan needs the model's shape, from the checkpoint it starts from
            print(plan_for_stage(cfg, ModelConfig.from_dict(read_config(cfg.init)["model"]), world_size()).table())
        return
    result = stage.run(cfg)   # under torchrun (--fsdp) every rank runs the stage, rank 0 writes and prints
    teardown_runtime()
    if int(os.environ.get("RANK", "0")) == 0:
        stage.show(result)


def cmd_train(args) -> None:
    # --set may name a TrainConfig or a ModelConfig field; the model's fields go to cfg.model
    overrides = {**set_fields(args, pretrain.TrainConfig, skip=("preset", "model")),
                 **parse_set(args.set, pretrain.TrainConfig, ModelConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = {**set_fields(args, ModelConfig), **{k: v for k, v in overrides.items() if k in model_fields}}
    cfg = pretrain.train_config(args.preset, **{k: v for k, v in overrides.items() if k not in model_fields},
                                model=model)
    if not cfg.data_dir:  # the default data: the pipeline's two phases, built once (by rank 0 under torchrun)
        rank = int(os.environ.get("RANK", "0"))  # set by torchrun
        vocab_size = get_preset(cfg.preset, **cfg.model).vocab_size
        # rank 0 builds the data, the other ranks wait for it: no two processes write the same shards
        phase1, phase2 = default_data(vocab_size, cfg.pipeline_docs_per_source, build=rank == 0 and not args.dry_run,
                                      wait=rank != 0)
        cfg.data_dir, cfg.phase2_dir = str(phase1), cfg.phase2_dir or str(phase2)
    if args.dry_run:
        print(cfg)
        print(plan_for_stage(cfg, get_preset(cfg.preset, **cfg.model), world_size()).table())
        return
    summary = pretrain.train(cfg)
    if summary.get("val_loss") is None:
        return  # a non-zero DDP rank
    print(f"\nvalidation loss {summary['val_loss']:.3f} nats/token ({summary['val_bpb']:.3f} bits/byte); "
          f"unigram entropy of the training tokens {summary['unigram_entropy']:.3f} nats")
    print(f"checkpoint: {summary['checkpoint']}")
    if args.samples:
        ck = load_checkpoint(summary["checkpoint"])
        for prompt, text in zip(SAMPLE_PROMPTS, generate_text(ck.model, ck.tokenizer, SAMPLE_PROMPTS,
                                                               max_new_tokens=48, temperature=0.8, top_k=50)):
            print(f"\n--- {prompt!r} ->\n{prompt}{text}")


def cmd_prepare(args) -> None:
    print(f"prepared data in {prepare_data(args.data_dir, args.vocab_size)}")


def cmd_data(args) -> None:
    cfg = config_from_args(args)
    run_pipeline(cfg)
    print(f"{cfg.out}/manifest.md:\n")
    print((Path(cfg.out) / "manifest.md").read_text())


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))   # set by torchrun


def cmd_memory(args) -> None:
    cfg = get_preset(args.preset)
    print(plan_memory(cfg, args.batch_size, args.seq_len or cfg.max_seq_len, dtype=args.dtype, lora_r=args.lora_r,
                      world=args.world, fsdp=args.fsdp, checkpointing=args.checkpointing).table())


def cmd_speedrun(args) -> None:
    cfg = SpeedrunConfig(preset=args.preset, out_dir=args.out_dir, only=args.only, device=args.device,
                         dtype=args.dtype, dry_run=args.dry_run, overrides=parse_overrides(args.set))
    if cfg.dry_run:
        model_cfg = get_preset(SPEEDRUN_PRESETS[cfg.preset])
        for name, stage_cfg in plan(cfg):
            print(f"{name}: {stage_cfg}")
            if hasattr(stage_cfg, "batch_size"):   # the stages that train a model
                print(plan_for_stage(stage_cfg, model_cfg, world_size()).table())
        return
    records = run_speedrun(cfg)
    for name, rec in records.items():
        print(f"  {name:10s} {rec['seconds']:8.1f} s  {rec.get('checkpoint') or ''}")
    if "report" in records:
        print(f"report: {records['report']['result']['report']}")


def cmd_presets(args) -> None:
    for name, (fields, what) in PRESETS.items():
        print(f"{name:12s} {what}")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any field of the config, e.g. --set log_every=1 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the config and stop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a model (prepares the default data when needed)")
    p.add_argument("--preset", default="tiny", choices=sorted(set(PRESETS) | set(pretrain.TRAIN_PRESETS)),
                   help="model preset (tiny, small, ...) or a speedrun size (ci, laptop, gpu)")
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                   help="print samples from the trained model")
    add_config_flags(p, pretrain.TrainConfig, pretrain.FLAGS, skip=("preset", "model"))  # flags of their own
    add_config_flags(p, ModelConfig, MODEL_FLAGS)
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenize the stdlib docstrings into shards (a quick one-phase corpus)")
    p.add_argument("--data-dir", default="runs/data/stdlib-2048")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="the data pipeline: sources, filters, dedup, classifier, two phases")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_data)

    add_checkpoint_commands(sub)   # generate, chat, serve, export-hf, import-hf

    for name, stage in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=stage.help)
        p.add_argument("--preset", default="tiny", choices=list(stage.presets))
        add_config_flags(p, stage.cls, STAGE_FLAGS[name], choices=stage.choices)
        _add_run_flags(p)
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("speedrun", help="every stage from data to report.md (skips finished stages)")
    p.add_argument("--preset", default="laptop", choices=list(SPEEDRUN_PRESETS))
    p.add_argument("--out-dir", default="", help="default: runs/speedrun-<preset>")
    p.add_argument("--only", default="", help="comma-separated stages to re-run alone, e.g. sft,eval,report")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one field of one stage's config, e.g. --set sft.max_steps=100")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the chip has native bf16, else float32")
    p.add_argument("--dry-run", action="store_true", help="print every stage's config and stop")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("memory", help="the per-GPU memory plan of training a model preset (minilm/memory.py)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--seq-len", type=int, default=0, help="0: the preset's max_seq_len")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="activations' dtype")
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--world", type=int, default=1, help="GPUs")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over --world")
    p.add_argument("--checkpointing", action="store_true", help="keep only each layer's input for backward")
    p.set_defaults(func=cmd_memory)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. which ops backend runs
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (MinilmError, ConfigError, TokenizerError, OSError) as e:   # OSError: a full disk, a read-only folder
        print(f"minilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:  # a --set value of the wrong kind reaches a dataclass or a check
        if "__init__" not in str(e):
            raise
        print(f"minilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in (*CHECKPOINT_COMMANDS, "presets"):
            return 130  # nothing was being trained, so there is nothing to resume
        print(f"\nminilm {args.command}: interrupted. Checkpoints are written atomically; run the same "
              f"command again to resume from the last one.", file=sys.stderr)
        return 130
    return 0
