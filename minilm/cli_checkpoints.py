"""The commands that use a finished checkpoint: generate, chat, serve, export-hf, import-hf.

    minilm generate runs/tiny/checkpoint --prompt "Return the" --max-new-tokens 40
    minilm chat runs/sft-tiny/checkpoint --system "Answer briefly."
    minilm serve runs/sft-tiny/checkpoint --run runs/speedrun-laptop
    minilm export-hf runs/tiny/checkpoint runs/tiny-hf
    minilm import-hf ~/models/Phi-3-mini-4k-instruct runs/phi3-mini

minilm/cli.py builds the parser and calls `add_checkpoint_commands(sub)` for these; each `cmd_*`
raises MinilmError for a user's mistake, which cli.main turns into one message and exit code 2.
None of them trains, so an interrupt leaves nothing to resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.chat_cli import run_chat
from minilm.checkpoint import export_hf, import_hf, load_checkpoint, save_checkpoint
from minilm.config import check_values
from minilm.generate import generate_text
from minilm.hf_tokenizer import load_hf_tokenizer
from minilm.tokenizer import Tokenizer

COMMANDS = ("generate", "chat", "serve", "export-hf", "import-hf")


def cmd_generate(args) -> None:
    ck = load_checkpoint(args.checkpoint)
    if ck.tokenizer is None:
        raise MinilmError(f"{args.checkpoint} has no tokenizer; it cannot turn text into tokens")
    check_values(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p)
    g = torch.Generator().manual_seed(args.seed)  # the same seed, the same samples
    try:
        texts = generate_text(ck.model, ck.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
    except ValueError as e:   # a prompt plus its budget past the context
        raise MinilmError(f"{e}; shorten the prompt or lower --max-new-tokens") from e
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}\n")


def cmd_chat(args) -> None:
    run_chat(args.checkpoint, system=args.system, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device)


def cmd_serve(args) -> None:
    try:   # imported here: FastAPI and uvicorn are an optional extra that only this command needs
        from minilm.serve import serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise MinilmError(f"minilm serve needs FastAPI and uvicorn ({e}); install them with "
                          f"pip install -e \".[serve]\"") from None
    serve(args.checkpoint, host=args.host, port=args.port, run_dir=args.run, max_queue=args.max_queue,
          device=args.device)


def cmd_export_hf(args) -> None:
    ck = load_checkpoint(args.checkpoint)
    print(f"wrote {export_hf(ck.model, args.out_dir, tokenizer=ck.tokenizer)}")


def cmd_import_hf(args) -> None:
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    elif (Path(args.hf_dir) / "tokenizer.json").exists():
        try:
            tokenizer = load_hf_tokenizer(args.hf_dir)   # byte-level BPE, or Phi-3-mini's SentencePiece BPE
        except MinilmError as e:
            print(f"warning: {e}. The checkpoint is written without a tokenizer; attach one with --tokenizer DIR",
                  file=sys.stderr)
            tokenizer = None
    else:
        tokenizer = None
    model = import_hf(args.hf_dir)
    print(f"wrote {save_checkpoint(args.out_dir, model, tokenizer, meta={'stage': 'import-hf'})}")


def add_checkpoint_commands(sub) -> None:
    """Add this module's commands to the subparsers `sub` of `minilm`'s parser."""
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

    p = sub.add_parser("serve", help="an OpenAI-compatible chat API and a chat page for a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="default: this machine only (0.0.0.0: every interface)")
    p.add_argument("--port", default="8000")   # checked by serve(): a bad value is one error line
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="a run folder: its report.md on a second tab")
    p.add_argument("--max-queue", default="16", help="requests waiting at most; more get HTTP 429")
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face Phi-3 directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="read a Hugging Face Phi-3 directory into a checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", default=None, help="a directory holding a minilm tokenizer to attach "
                                                    "(default: the HF directory's own tokenizer.json)")
    p.set_defaults(func=cmd_import_hf)
