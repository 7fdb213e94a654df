"""Greedy generation speed: `minilm.generate` against transformers' `generate` on the same exported model.

    python benchmarks/generation.py                                  # a tiny-preset model, batch 1 and 8
    python benchmarks/generation.py --init runs/speedrun-laptop/sft/checkpoint --new-tokens 128
    python benchmarks/generation.py --preset small --batch 1 --repeats 5 --no-ragged

The model (a checkpoint, or a randomly initialised preset: decoding costs the same whatever the
weights) is written with `export_hf` and loaded back by `AutoModelForCausalLM`, so both sides run
the very same weights, in float32 on the CPU, with a KV cache: minilm's is preallocated for the
whole reply (minilm/model.py KVCache), transformers uses its default cache. Each batch row gets
a random prompt of --prompt-len tokens and exactly --new-tokens greedy tokens (no stop token), and
the two sides must produce the same tokens, which the table reports. The last row ("8 ragged") gives
the largest batch prompts of different lengths, --prompt-len / 2 up to --prompt-len, left-padded on
both sides: the case of every evaluation, where each decode step masks each row's padding.

Timing: the sides alternate for --repeats rounds after one warm-up call each; the table gives tokens
per second from the minimum and the median of the rounds, and the ratio minilm / transformers.
The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from minilm.checkpoint import export_hf, load_checkpoint
from minilm.config import get_preset
from minilm.generate import generate, left_pad
from minilm.model import Phi3


def load_model(args) -> Phi3:
    if args.init:
        return load_checkpoint(args.init).model
    torch.manual_seed(0)
    return Phi3(get_preset(args.preset))


def seconds(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="", help="a minilm checkpoint folder (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per side (>= 3)")
    p.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True,
                   help="also the largest batch with prompts of different lengths (left padding)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    ours = load_model(args).eval()
    cfg = ours.config
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens must fit max_seq_len {cfg.max_seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    print(f"{torch.get_num_threads()} threads, float32, {ours.num_params() / 1e6:.1f}M parameters, prompt "
          f"{args.prompt_len} + {args.new_tokens} greedy tokens; load average {os.getloadavg()[0]:.2f} (1 min) at start")
    print(f"{'batch':>8s} {'transformers tok/s min/med':>24s} {'minilm tok/s min/med':>21s} "
          f"{'speedup (min)':>13s} {'(median)':>8s} {'same tokens':>11s}")
    rows = [(b, False) for b in args.batch] + ([(max(args.batch), True)] if args.ragged else [])
    for b, ragged in rows:
        g = torch.Generator().manual_seed(b)
        prompts = [torch.randint(cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        if ragged:  # row i keeps its last len_i tokens, len_i from prompt_len / 2 up to prompt_len
            lengths = torch.linspace(args.prompt_len // 2, args.prompt_len, b).long().tolist()
            prompts = [p[len(p) - n:] for p, n in zip(prompts, lengths)]
        padded, mask = left_pad(prompts, pad_id=0)  # transformers' input: the same left padding
        n = args.new_tokens

        def run_minilm():
            return generate(ours, prompts, n, temperature=0.0).tokens

        @torch.no_grad()
        def run_hf():
            return theirs.generate(padded, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

        same = torch.equal(run_minilm(), run_hf())  # also the warm-up of both
        times = {"hf": [], "minilm": []}
        for _ in range(args.repeats):
            times["hf"] += seconds(run_hf, 1)
            times["minilm"] += seconds(run_minilm, 1)
        rate = {k: (b * n / min(v), b * n / statistics.median(v)) for k, v in times.items()}
        label = f"{b} ragged" if ragged else str(b)
        print(f"{label:>8s} {rate['hf'][0]:10.0f} / {rate['hf'][1]:11.0f} {rate['minilm'][0]:10.0f} / "
              f"{rate['minilm'][1]:8.0f} {rate['minilm'][0] / rate['hf'][0]:12.2f}x "
              f"{rate['minilm'][1] / rate['hf'][1]:7.2f}x {'yes' if same else 'NO':>11s}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    main()
