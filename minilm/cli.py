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
    minilm generate runs/tiny/checkpoint --prompt "Return the" --max-new-tokens 40
    minilm chat runs/sft-tiny/checkpoint --system "Answer briefly."   # or: printf 'Hi\n' | minilm chat ...
    minilm export-hf runs/tiny/checkpoint runs/tiny-hf
    minilm presets

Each stage is a library function; this file only turns flags into its dataclass fields (one flag
per field, `--max-steps` sets `max_steps`) and turns user errors into one message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from minilm import MinilmError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}
SAMPLE_PROMPTS = ["Return the", "This module provides", "If the file"]


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One `--field-name` flag per dataclass field; defaults are None so presets can fill them."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _TYPES.get(f.type if isinstance(f.type, str) else f.type.__name__)  # "int" -> int
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind is tuple:
            parser.add_argument(flag, type=float, nargs="+", default=None)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())


def _stage_parser(sub, name: str, help: str, cls, func, presets=None, skip=()) -> argparse.ArgumentParser:
    """A post-training stage's subcommand: `--preset` (if it has presets) plus one flag per field."""
    p = sub.add_parser(name, help=help)
    if presets is not None:
        p.add_argument("--preset", default="tiny", choices=list(presets))
    _add_dataclass_flags(p, cls, skip=skip)
    p.set_defaults(func=func)
    return p


def _set_fields(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def cmd_train(args) -> None:
    from minilm.checkpoint import load_checkpoint
    from minilm.config import ModelConfig
    from minilm.generate import generate_text
    from minilm.train import TrainConfig, train, train_config

    model_overrides = _set_fields(args, ModelConfig)
    cfg = train_config(args.preset, **_set_fields(args, TrainConfig, skip=("preset", "model")),
                       model=model_overrides)
    summary = train(cfg)
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
    from minilm.data import prepare_data
    out = prepare_data(args.data_dir, args.vocab_size)
    print(f"prepared data in {out}")


def cmd_data(args) -> None:
    from data_prep.pipeline import config_from_args, run_pipeline
    cfg = config_from_args(args)
    run_pipeline(cfg)
    print(f"{cfg.out}/manifest.md:\n")
    print((Path(cfg.out) / "manifest.md").read_text())


def cmd_generate(args) -> None:
    import torch

    from minilm.checkpoint import load_checkpoint
    from minilm.generate import generate_text
    ck = load_checkpoint(args.checkpoint)
    if ck.tokenizer is None:
        raise MinilmError(f"{args.checkpoint} has no tokenizer; it cannot turn text into tokens")
    g = torch.Generator().manual_seed(args.seed)
    texts = generate_text(ck.model, ck.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}\n")


def cmd_chat(args) -> None:
    from minilm.chat_cli import run_chat
    run_chat(args.checkpoint, system=args.system, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device)


def cmd_export_hf(args) -> None:
    from minilm.checkpoint import export_hf, load_checkpoint
    print(f"wrote {export_hf(load_checkpoint(args.checkpoint).model, args.out_dir)}")


def cmd_import_hf(args) -> None:
    from minilm.checkpoint import import_hf, save_checkpoint
    tokenizer = None
    if args.tokenizer:
        from minilm.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(args.tokenizer)
    model = import_hf(args.hf_dir)
    print(f"wrote {save_checkpoint(args.out_dir, model, tokenizer, meta={'stage': 'import-hf'})}")


def cmd_sft(args) -> None:
    from minilm.post.sft import SFTConfig, run_sft, sft_config
    result = run_sft(sft_config(args.preset, **_set_fields(args, SFTConfig)))
    print(f"\nheld-out prompts ({result['n_heldout']}), greedy replies:   before -> after SFT")
    for key in sorted(result["before"]):
        print(f"  {key:22s} {result['before'][key]:6.3f} -> {result['after'].get(key, float('nan')):6.3f}")
    print(f"checkpoint: {result['checkpoint']}")


def cmd_prune(args) -> None:
    from minilm.prune.apply import PruneConfig, run_prune
    r = run_prune(PruneConfig(**_set_fields(args, PruneConfig)))
    print(f"\n{r['method']} ({r['ranking']} ranking), sparsity {r['sparsity']}: per-layer density "
          f"{', '.join(f'{d:.2f}' for d in r['densities'])}")
    print(f"  held-out loss {r['before']['heldout_loss']:.3f} -> {r['after']['heldout_loss']:.3f} (dense -> pruned)")
    for key in ("redundancy", "sensitivity"):
        before, after = r["redundancy_before"][key], r["redundancy_after"][key]
        print(f"  {key:12s} " + "  ".join(f"L{i} {b:.3g}->{a:.3g}" for i, (b, a) in enumerate(zip(before, after))))
    print(f"masked checkpoint: {r['masked_checkpoint']}"
          + (f"\ncompact checkpoint: {r['compact']['path']}" if r["compact"] else ""))


def cmd_reward(args) -> None:
    from minilm.post.reward import RewardConfig, reward_config, run_reward
    result = run_reward(reward_config(args.preset, **_set_fields(args, RewardConfig)))
    before, after = result["before"], result["after"]
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}):   before -> after")
    for key in ("eval_accuracy", "eval_margin", "eval_bt_loss", "eval_lm_loss"):
        print(f"  {key:16s} {before[key]:7.3f} -> {after[key]:7.3f}")
    for reason, acc in after["by_reason"].items():
        print(f"  accuracy on {reason!r}: {before['by_reason'][reason]:.3f} -> {acc:.3f}")
    print(f"checkpoint (heads in heads.safetensors): {result['checkpoint']}")


def cmd_dpo(args) -> None:
    from minilm.post.dpo import DPOConfig, dpo_config, run_dpo
    result = run_dpo(dpo_config(args.preset, **_set_fields(args, DPOConfig)))
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}): accuracy {result['eval_accuracy']:.3f}, "
          f"margin {result['eval_margin']:.3f}, chosen/rejected implicit reward "
          f"{result['eval_chosen_reward']:.3f} / {result['eval_rejected_reward']:.3f}; the model itself "
          f"ranks chosen first: SFT {result['eval_ref_ranks_chosen']:.3f} -> DPO {result['eval_policy_ranks_chosen']:.3f}")
    print(f"held-out prompts ({result['n_judge']}), greedy replies:   SFT -> DPO")
    for key in result["sft"]:
        print(f"  {key:14s} {result['sft'][key]:6.3f} -> {result['dpo'][key]:6.3f}")
    h2h = result["dpo_vs_sft"]
    print(f"  DPO reply preferred over the SFT reply: {h2h['preferred_rate']:.3f} "
          f"(wins {h2h['win_rate']:.3f}, ties {h2h['tie_rate']:.3f})")
    print(f"checkpoint: {result['checkpoint']}")


def cmd_dno(args) -> None:
    if args.oracle == "cyclic":   # the tabular intransitive-oracle demo (minilm/post/dno.py)
        from minilm.post.dno import cyclic_demo
        d = cyclic_demo(iterations=args.iterations or 300)
        print(f"rock-paper-scissors oracle: best Bradley-Terry fit {d['bt_loss']:.3f} nats vs the "
              f"preferences' own entropy {d['entropy']:.3f} (a point-wise reward cannot fit a cycle)")
        for name, key in (("DNO average iterate", "average"), ("DNO last iterate", "last"),
                          ("von Neumann winner", "nash")):
            print(f"  {name:20s} " + "  ".join(f"{r} {p:.3f}" for r, p in zip(d["responses"], d[key])))
        return
    from minilm.post.dno_loop import DNOConfig, dno_config, run_dno
    result = run_dno(dno_config(args.preset, **_set_fields(args, DNOConfig)))
    print("\n" + result["table"])
    print(f"best iterate on validation: {result['best_iteration']} ({result['best_checkpoint']})")


def cmd_hydra_sft(args) -> None:
    from minilm.post.hydra import HydraSFTConfig, hydra_sft_config, run_hydra_sft
    result = run_hydra_sft(hydra_sft_config(args.preset, **_set_fields(args, HydraSFTConfig)))
    before, after = result["before"], result["after"]
    print(f"\nheld-out pairs ({result['n_heldout_pairs']}) and prompts, greedy replies:   before -> after")
    for key in ("eval_accuracy", "eval_bt_loss", "eval_lm_loss", "reward", "end_rate"):
        if key in before and key in after:
            print(f"  {key:16s} {before[key]:7.3f} -> {after[key]:7.3f}")
    print(f"checkpoint (heads in heads.safetensors): {result['checkpoint']}")


def cmd_ppo(args) -> None:
    from minilm.post.ppo_loop import PPOConfig, ppo_config, run_ppo
    result = run_ppo(ppo_config(args.preset, **_set_fields(args, PPOConfig)))
    print(f"\nPPO ({result['variant']}), held-out prompts, greedy replies:   before -> after")
    for key in sorted(result["before"]):
        print(f"  {key:14s} {result['before'][key]:7.3f} -> {result['after'].get(key, float('nan')):7.3f}")
    print(f"final KL {result['final_kl']:.3f} nats/reply, length {result['final_length']:.1f} tokens, "
          f"{result['sec_per_sample']:.3f} s/sample")
    print(f"checkpoint: {result['checkpoint']}")


def cmd_ltc(args) -> None:
    from minilm.agents.ltc import LTCConfig, ltc_config, run_ltc
    r = run_ltc(ltc_config(args.preset, **_set_fields(args, LTCConfig)))
    b, t = r["baseline"], r["ltc"]
    print(f"\nheld-out {r['env']} ({r['pattern']}, loss {r['loss']}):   IL baseline -> LTC")
    print(f"  success (EM / accuracy) {b['success']:6.3f} -> {t['success']:6.3f}")
    print(f"  score (F1 for qa)       {b['score']:6.3f} -> {t['score']:6.3f}")
    print(f"checkpoint: {r['checkpoint']} (curves.png and metrics.jsonl beside it)")


def cmd_speedrun(args) -> None:
    from minilm.speedrun import SpeedrunConfig, parse_overrides, plan, run_speedrun
    cfg = SpeedrunConfig(preset=args.preset, out_dir=args.out_dir, only=args.only, device=args.device,
                         dry_run=args.dry_run, overrides=parse_overrides(args.set))
    if cfg.dry_run:
        for name, stage_cfg in plan(cfg):
            print(f"{name}: {stage_cfg}")
        return
    records = run_speedrun(cfg)
    for name, rec in records.items():
        print(f"  {name:10s} {rec['seconds']:8.1f} s  {rec.get('checkpoint') or ''}")
    if "report" in records:
        print(f"report: {records['report']['result']['report']}")


def cmd_presets(args) -> None:
    from minilm.config import PRESETS
    for name, (fields, what) in PRESETS.items():
        print(f"{name:12s} {what}")


def build_parser() -> argparse.ArgumentParser:
    from minilm.config import PRESETS, ModelConfig
    from minilm.train import TrainConfig

    parser = argparse.ArgumentParser(prog="minilm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a model (prepares the default data when needed)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                   help="print samples from the trained model")
    _add_dataclass_flags(p, TrainConfig, skip=("preset", "model"))
    _add_dataclass_flags(p, ModelConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenize the stdlib docstrings into shards (a quick one-phase corpus)")
    p.add_argument("--data-dir", default="runs/data/stdlib-2048")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="the data pipeline: sources, filters, dedup, classifier, two phases")
    from data_prep.pipeline import add_pipeline_args
    add_pipeline_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal with a checkpoint (streams the reply; reads "
                                    "one message a line from a pipe)")
    p.add_argument("checkpoint")
    p.add_argument("--system", default=None, help="the system message (also: /system TEXT in the chat)")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face Phi-3 directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="read a Hugging Face Phi-3 directory into a checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", default=None, help="a directory holding a minilm tokenizer to attach")
    p.set_defaults(func=cmd_import_hf)

    from minilm.post.sft import SFT_PRESETS, SFTConfig
    _stage_parser(sub, "sft", "supervised fine-tuning on chat data (full or --lora-r N)", SFTConfig,
                  cmd_sft, SFT_PRESETS)

    from minilm.prune.apply import PruneConfig
    _stage_parser(sub, "prune", "fine-tune while pruning FFN neurons: --method magnitude|random|movement|gum",
                  PruneConfig, cmd_prune)

    from minilm.post.reward import REWARD_PRESETS, RewardConfig
    _stage_parser(sub, "reward", "reward model on preference pairs (Bradley-Terry; --lm-weight: Hydra-SFT)",
                  RewardConfig, cmd_reward, REWARD_PRESETS)

    from minilm.post.dpo import DPO_PRESETS, DPOConfig
    _stage_parser(sub, "dpo", "direct preference optimization from an SFT checkpoint", DPOConfig, cmd_dpo,
                  DPO_PRESETS)

    from minilm.post.dno_loop import DNO_PRESETS, DNOConfig
    p = _stage_parser(sub, "dno", "Direct Nash Optimization, iterated (--oracle verifier|reward|judge|cyclic)",
                      DNOConfig, cmd_dno, DNO_PRESETS, skip=("oracle",))
    p.add_argument("--oracle", default=None, choices=["verifier", "reward", "judge", "cyclic"])

    from minilm.post.hydra import HYDRA_SFT_PRESETS, HydraSFTConfig
    _stage_parser(sub, "hydra-sft", "Hydra-SFT: one model trained on SFT chats and preference pairs",
                  HydraSFTConfig, cmd_hydra_sft, HYDRA_SFT_PRESETS)

    from minilm.post.ppo_loop import PPO_PRESETS, PPOConfig
    from minilm.post.ppo_models import VARIANTS
    p = _stage_parser(sub, "ppo", "PPO against a reward model: --variant ppo, lora, hydra or jhydra",
                      PPOConfig, cmd_ppo, PPO_PRESETS, skip=("variant",))
    p.add_argument("--variant", default=None, choices=list(VARIANTS))

    from minilm.agents.ltc import LTC_PRESETS, LOSSES, LTCConfig
    from minilm.agents.patterns import PATTERNS
    p = _stage_parser(sub, "ltc", "LTC: expert demos, then explore + LM/PPO updates (--env, --pattern)",
                      LTCConfig, cmd_ltc, LTC_PRESETS, skip=("env", "pattern", "loss"))
    p.add_argument("--env", default=None, choices=["household", "qa", "math"])
    p.add_argument("--pattern", default=None, choices=list(PATTERNS))
    p.add_argument("--loss", default=None, choices=list(LOSSES))

    from minilm.speedrun import SPEEDRUN_PRESETS
    p = sub.add_parser("speedrun", help="every stage from data to report.md (skips finished stages)")
    p.add_argument("--preset", default="laptop", choices=list(SPEEDRUN_PRESETS))
    p.add_argument("--out-dir", default="", help="default: runs/speedrun-<preset>")
    p.add_argument("--only", default="", help="comma-separated stages to re-run alone, e.g. sft,eval,report")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one field of one stage's config, e.g. --set sft.max_steps=100")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="print every stage's config and stop")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    from minilm.config import ConfigError
    from minilm.tokenizer import TokenizerError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (MinilmError, ConfigError, TokenizerError, FileNotFoundError) as e:
        print(f"minilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in ("chat", "generate", "presets", "export-hf", "import-hf"):
            return 130  # nothing was being trained, so there is nothing to resume
        print(f"\nminilm {args.command}: interrupted. Checkpoints are written atomically; run the same "
              f"command again to resume from the last one.", file=sys.stderr)
        return 130
    return 0
