"""The command line: `minilm <stage> [--flags]` (also `python -m minilm ...`, and under torchrun).

    minilm train --preset tiny                  # prepare stdlib data, pretrain, sample
    minilm train --preset tiny --max-steps 50 --n-layer 2 --out-dir runs/quick
    minilm generate runs/tiny/checkpoint --prompt "Return the" --max-new-tokens 40
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

    p = sub.add_parser("prepare", help="tokenize the default corpus into shards")
    p.add_argument("--data-dir", default="runs/data/stdlib-2048")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face Phi-3 directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="read a Hugging Face Phi-3 directory into a checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", default=None, help="a directory holding a minilm tokenizer to attach")
    p.set_defaults(func=cmd_import_hf)

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
        print(f"\nminilm {args.command}: interrupted. Checkpoints are written atomically; run the same "
              f"command again to resume from the last one.", file=sys.stderr)
        return 130
    return 0
