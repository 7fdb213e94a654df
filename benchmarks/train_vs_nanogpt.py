"""minilm's training step against a nanoGPT-style GPT step of the same size, timed side by side.

    python benchmarks/train_vs_nanogpt.py                  # both shapes, 3 rounds of 5 timed steps
    python benchmarks/train_vs_nanogpt.py --shapes 6L-d256 --rounds 5
    python benchmarks/train_vs_nanogpt.py --profile        # + where minilm's step spends its time

The peer is written here from nanoGPT's published architecture (Karpathy, 2022): learned position
embeddings, pre-LayerNorm blocks with bias, multi-head attention through SDPA, a GELU MLP of 4d,
the output layer tied to the token embedding, and nanoGPT's CPU training step: float32 (its
train.py autocasts only on CUDA), AdamW (0.9, 0.95) with decay on matrices, clip 1.0.

minilm runs its own layer (RMSNorm, RoPE, grouped-query attention through csrc/ kernels, SwiGLU)
at the same depth, width, heads, vocabulary, batch and sequence, with d_ff chosen so the two
models have the same parameter count (within 1%), in the dtype `minilm.runtime` picks by default:
bf16 autocast on a CPU with native bf16, float32 elsewhere. `--dtype fp32` compares like for like.

Timing: the two steps alternate in rounds (each round times --steps steps of each, after warm-up),
so both see the same machine load; the table gives each side's minimum and median step over all
rounds, and the ratio of minima. The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm.config import ModelConfig
from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.runtime import setup_runtime
from minilm.stages.pretrain import TrainConfig

# name -> (layers, d_model, heads, seq_len, batch, vocab): the shapes the speed target names
SHAPES = {"6L-d256": (6, 256, 4, 256, 16, 8192), "8L-d512": (8, 512, 8, 512, 8, 8192)}


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT's model: token + learned position embeddings, pre-LN blocks, tied output layer."""

    def __init__(self, layers: int, d: int, heads: int, seq_len: int, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # nanoGPT's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def gpt_optimizer(model: GPT) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one Parameter, counted once


def matched_minilm(layers: int, d: int, heads: int, seq_len: int, vocab: int, target: int) -> ModelConfig:
    """minilm's layer at the GPT's shape, GQA with heads/2 kv heads, d_ff sized to `target` parameters."""
    def config(d_ff: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab, n_layer=layers, n_head=heads, n_kv_head=heads // 2, d_model=d,
                           d_ff=d_ff, max_seq_len=seq_len, tie_embeddings=True)
    base = num_params(Phi3(config(8)))
    per_unit = 3 * d * layers  # each d_ff unit adds a gate, an up and a down weight of d in every layer
    return config(max(8, round((target - base) / per_unit) + 8))


def make_step(model: nn.Module, optimizer, x, y, autocast, loss_of):
    def step():
        with autocast():
            loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def profile(step, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of timed steps (>= 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="minilm's dtype: auto (the default runtime's choice), bf16, fp32")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of minilm's step")
    args = p.parse_args()

    rt = setup_runtime("cpu", args.dtype)
    fp32 = torch.amp.autocast("cpu", enabled=False)
    minilm_dtype = str(rt.autocast_dtype or torch.float32).replace("torch.", "")
    print(f"{torch.get_num_threads()} threads, minilm in {minilm_dtype}, nanoGPT in float32, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at start")
    print(f"{'shape':8s} {'params':>8s} {'minilm d_ff':>11s} {'nanoGPT min/med ms':>19s} "
          f"{'minilm min/med ms':>18s} {'speedup (min)':>13s} {'(median)':>8s}")
    for name in args.shapes:
        layers, d, heads, seq_len, batch, vocab = SHAPES[name]
        torch.manual_seed(0)
        gpt = GPT(layers, d, heads, seq_len, vocab)
        ours = Phi3(matched_minilm(layers, d, heads, seq_len, vocab, num_params(gpt)))
        assert abs(num_params(ours) / num_params(gpt) - 1) < 0.01, (num_params(ours), num_params(gpt))
        tokens = torch.randint(vocab, (batch, seq_len + 1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        steps = {
            "gpt": make_step(gpt, gpt_optimizer(gpt), x, y, lambda: fp32, lambda m, a, b: m(a, b)),
            "minilm": make_step(ours, make_optimizer(ours, TrainConfig().optim), x, y, rt.autocast,
                                lambda m, a, b: m(a, b)[1]),
        }
        times = {k: [] for k in steps}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.rounds):
            for k, step in steps.items():
                times[k] += timed(step, args.steps)
        (g_min, g_med), (m_min, m_med) = ((min(times[k]), statistics.median(times[k])) for k in ("gpt", "minilm"))
        print(f"{name:8s} {num_params(gpt) / 1e6:7.2f}M {ours.config.d_ff:11d} {g_min * 1e3:9.0f} / {g_med * 1e3:7.0f} "
              f"{m_min * 1e3:8.0f} / {m_med * 1e3:7.0f} {g_min / m_min:12.2f}x {g_med / m_med:7.2f}x")
        if args.profile:
            profile(steps["minilm"])
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    main()
