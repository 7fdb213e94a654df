"""FFN masking benchmark: dense FFN times a 0/1 mask vs minilm's masked kernel vs the compacted FFN.

    python benchmarks/ffn_masking.py                       # CPU, `small` preset's FFN, 1 thread, ~35 s
    python benchmarks/ffn_masking.py --tokens 16 --repeat 20 --threads 0   # decoding; all threads

One gated-SiLU FFN layer (d_model 512, d_ff 1408 as in the `small` preset) on --tokens tokens, at
densities 100/75/50/25% (fraction of neurons kept, a random mask), three ways in one run:
  dense*mask   masked_ffn_reference: all d_ff neurons computed, pruned ones multiplied by 0
  kernel       minilm.ops.masked_ffn: gathers the kept neurons, matmuls over them only
  compacted    the FFN of compact_ffn's smaller weights (gathered once, outside the timing)
For each: forward (no grad) and forward+backward (gradients for x and the weights) times, the
fastest of --repeat runs after a warm-up (the run least disturbed by other work on the machine),
the implementations taking turns so that such work slows them alike.
Printed as milliseconds and as speed-ups over dense*mask at the same density; the goal is time
falling in proportion to density for the kernel and the compacted FFN, a speed-up of about 1 / density.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from minilm.ops import compact_ffn, masked_ffn
from minilm.ops.reference import masked_ffn_reference

DENSITIES = (1.0, 0.75, 0.5, 0.25)


def swiglu_ffn(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def phases(impl, x, weights) -> tuple:
    """(forward, forward+backward) of impl(x, *weights) as zero-argument callables."""
    def forward():
        with torch.no_grad():
            impl(x, *weights)

    def forward_backward():
        out = impl(x, *weights)
        torch.autograd.grad(out, (x, *weights), torch.ones_like(out))
    return forward, forward_backward


def best_times(calls: dict, repeat: int, sync) -> dict:
    """{name: fastest of `repeat` runs in ms} after one warm-up each. The calls take turns, round by
    round, so that load from other work on the machine falls on all of them alike."""
    best = {}
    for fn in calls.values():
        fn()
    for _ in range(repeat):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best.get(name, float("inf")), 1e3 * (time.perf_counter() - start))
    return best


def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)

    def param(*shape, std=0.02):
        return (std * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()
    x = param(args.tokens, args.d_model, std=1.0)
    gate_up, down = param(2 * args.d_ff, args.d_model), param(args.d_model, args.d_ff)
    rows = []
    for density in DENSITIES:
        mask = torch.zeros(args.d_ff)
        mask[torch.randperm(args.d_ff, generator=g)[:round(density * args.d_ff)]] = 1
        mask = mask.to(device, dtype)
        small = tuple(w.detach().requires_grad_() for w in compact_ffn(gate_up.detach(), down.detach(), mask))
        impls = {"dense*mask": (lambda x, gu, dn: masked_ffn_reference(x, gu, dn, mask), (gate_up, down)),
                 "kernel": (lambda x, gu, dn: masked_ffn(x, gu, dn, mask, backend="kernel"), (gate_up, down)),
                 "compacted": (swiglu_ffn, small)}
        calls = {(name, phase): fn for name, (impl, weights) in impls.items()
                 for phase, fn in enumerate(phases(impl, x, weights))}
        best = best_times(calls, args.repeat, sync)
        rows.append({"density": density, **{name: (best[name, 0], best[name, 1]) for name in impls}})
    return rows


def report(rows: list[dict]) -> None:
    full = rows[0]["dense*mask"]  # density 100%
    for phase, col in (("forward", 0), ("forward+backward", 1)):
        print(f"\n{phase}: ms, (speed-up over dense*mask at the same density; ideal 1/density),"
              f" [time / dense*mask's at 100%; ideal = density]")
        print(f"{'density':>8} {'dense*mask':>11} {'kernel':>24} {'compacted':>24}")
        for r in rows:
            base = r["dense*mask"][col]
            cells = [f"{r[k][col]:7.2f} ({base / r[k][col]:4.2f}x) [{r[k][col] / full[col]:4.2f}]"
                     for k in ("kernel", "compacted")]
            print(f"{r['density']:>8.0%} {base:>11.2f} {cells[0]:>24} {cells[1]:>24}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows of x (batch * sequence)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    # one thread by default: the ratios are what matter, and on a busy machine the thread pool's
    # waits can make small matmuls many times slower (we saw 25x at 16 tokens on 2 shared cores)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"FFN d_model={args.d_model} d_ff={args.d_ff}, {args.tokens} tokens, {args.dtype} on {args.device}"
          f" ({torch.get_num_threads()} threads)")
    report(run(args))


if __name__ == "__main__":
    main()
