"""One decoding step of attention: minilm's decode kernel against SDPA, on a left-padded KV cache.

    python benchmarks/decode_attention.py                  # tiny and small heads, batch 1 and 8
    python benchmarks/decode_attention.py --cached 64 512 --repeats 9

A step of `generate` with a KV cache: one new query per row and head against S cached keys, which
are views into the preallocated cache (B, H_kv, max_len, D), the half of each batch's rows left-padded
by S / 4. Both sides get exactly what the model gives them:
  minilm  torch.ops.minilm.attention_decode(q, k, v, key_start): the cache read in place, the
          padding as one start index per row (csrc/attention/attention_decode_cpu.cpp);
  sdpa    F.scaled_dot_product_attention with the boolean (B, 1, 1, S) padding mask, built once
          per step and outside the timing (a model shares it between layers).
Each time is the minimum and the median over --repeats rounds of --calls calls, single-threaded
(a decode step is far too small for a second thread); the ratio is SDPA's time over ours. The
outputs must agree to float32 rounding, which the last column checks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

import minilm.ops  # noqa: F401  (registers torch.ops.minilm)
from minilm.config import get_preset
from minilm.ops import PaddingMask


def step_inputs(preset: str, b: int, s: int):
    cfg = get_preset(preset)
    g = torch.Generator().manual_seed(s)
    q = torch.randn(b, cfg.n_head, 1, cfg.head_dim, generator=g)
    cache = torch.randn(2, b, cfg.n_kv_head, s + 64, cfg.head_dim, generator=g)  # room left, as in generate
    key_mask = torch.ones(b, s, dtype=torch.long)
    key_mask[: b // 2, : s // 4] = 0  # half the rows left-padded
    return q, cache[0, :, :, :s], cache[1, :, :, :s], PaddingMask(1, s, key_mask)


def per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return min(rounds), statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cached", type=int, nargs="+", default=[64, 256], help="cached keys S")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"1 thread, float32; load average {os.getloadavg()[0]:.2f} (1 min) at start")
    print(f"{'preset':>6s} {'B':>2s} {'S':>5s} {'sdpa us min/med':>16s} {'minilm us min/med':>18s} "
          f"{'speedup (min)':>13s} {'(median)':>8s} {'same':>5s}")
    with torch.inference_mode():
        for preset in args.presets:
            for b in args.batch:
                for s in args.cached:
                    q, k, v, mask = step_inputs(preset, b, s)
                    ours = partial(torch.ops.minilm.attention_decode, q, k, v, mask.key_start, q.shape[-1] ** -0.5)
                    sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask.dense, enable_gqa=True)
                    same = torch.allclose(ours(), sdpa(), atol=1e-5, rtol=1e-4)
                    t_sdpa = per_call_us(sdpa, args.calls, args.repeats)
                    t_ours = per_call_us(ours, args.calls, args.repeats)
                    print(f"{preset:>6s} {b:2d} {s:5d} {t_sdpa[0]:7.1f} / {t_sdpa[1]:6.1f} {t_ours[0]:8.1f} / "
                          f"{t_ours[1]:7.1f} {t_sdpa[0] / t_ours[0]:12.2f}x {t_sdpa[1] / t_ours[1]:7.2f}x "
                          f"{'yes' if same else 'NO':>5s}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    main()
