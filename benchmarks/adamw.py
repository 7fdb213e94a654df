"""AdamW's step: minilm's fused CPU update against torch.optim.AdamW, timed side by side.

    python benchmarks/adamw.py                       # the parameters of the two train_vs_nanogpt shapes
    python benchmarks/adamw.py --models tiny --rounds 5

Both optimizers get the parameters of the same model (a minilm preset or the shapes that
benchmarks/train_vs_nanogpt.py times) with the same random gradients, and the weight-decay groups
`make_optimizer` builds. torch.optim.AdamW runs as on a CPU by default (foreach=False: eight
whole-tensor ops per parameter); minilm.ops.AdamW fuses them into one pass (csrc/optim/). After
the timing the two copies must hold the same weights and moments bit for bit, which the table
reports. The steps alternate in rounds, so both sides see the same machine load; the table gives
each side's minimum and median step time and their ratios. The load average is printed at the
start and the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from minilm.config import ModelConfig, get_preset
from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.stages.pretrain import TrainConfig

# name -> the model whose parameters are stepped (the nanoGPT-matched shapes as train_vs_nanogpt builds them)
MODELS = {
    "tiny": lambda: get_preset("tiny"),
    "6L-d256": lambda: ModelConfig(vocab_size=8192, n_layer=6, n_head=4, n_kv_head=2, d_model=256, d_ff=786,
                                   max_seq_len=256, tie_embeddings=True),
    "8L-d512": lambda: ModelConfig(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1561,
                                   max_seq_len=512, tie_embeddings=True),
}


def timed_steps(optimizer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["6L-d256", "8L-d512"], choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of timed steps (>= 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    args = p.parse_args()

    optim = TrainConfig().optim
    print(f"{torch.get_num_threads()} threads, float32 parameters, load average {os.getloadavg()[0]:.2f} "
          f"(1 min) at start")
    print(f"{'model':8s} {'params':>8s} {'torch min/med ms':>17s} {'minilm min/med ms':>18s} "
          f"{'speedup (min)':>13s} {'(median)':>8s} {'same bits':>9s}")
    for name in args.models:
        torch.manual_seed(0)
        ours = Phi3(MODELS[name]())
        theirs = copy.deepcopy(ours)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.grad = torch.randn_like(a) * 1e-2
            b.grad = a.grad.clone()
        fused = make_optimizer(ours, optim)
        # torch's own optimizer over the same groups (make_optimizer's split: decay on matrices only)
        plain = torch.optim.AdamW(_same_groups(fused, ours, theirs))
        for opt in (fused, plain):  # warm-up: the first step allocates the moments
            opt.step()
        times = {"torch": [], "minilm": []}
        for _ in range(args.rounds):
            times["torch"] += timed_steps(plain, args.steps)
            times["minilm"] += timed_steps(fused, args.steps)
        same = all(torch.equal(a, b) and all(torch.equal(fused.state[a][k], plain.state[b][k])
                                             for k in ("exp_avg", "exp_avg_sq"))
                   for a, b in zip(ours.parameters(), theirs.parameters()))
        (t_min, t_med), (m_min, m_med) = ((min(times[k]), statistics.median(times[k])) for k in ("torch", "minilm"))
        print(f"{name:8s} {ours.num_params() / 1e6:7.2f}M {t_min * 1e3:8.1f} / {t_med * 1e3:6.1f} "
              f"{m_min * 1e3:9.1f} / {m_med * 1e3:6.1f} {t_min / m_min:12.2f}x {t_med / m_med:7.2f}x "
              f"{'yes' if same else 'NO':>9s}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at end")


def _same_groups(fused, ours, theirs) -> list[dict]:
    """fused's parameter groups and settings (lr, betas, weight decay, foreach=False), with each
    parameter of `ours` replaced by its twin in `theirs`."""
    twin = {id(a): b for a, b in zip(ours.parameters(), theirs.parameters())}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(q)] for q in g["params"]]}
            for g in fused.param_groups]


if __name__ == "__main__":
    main()
