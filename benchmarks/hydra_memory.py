"""Peak memory and latency per sample of one PPO step: ppo, lora, hydra, jhydra, with SFT alongside.

    python benchmarks/hydra_memory.py                      # CPU, tiny preset, about a minute
    python benchmarks/hydra_memory.py --batch-size 16 --new-tokens 48 --png runs/bench/hydra_memory.png
    python benchmarks/hydra_memory.py --preset small --device cuda     # on a GPU

Hydra-RLHF (arXiv 2309.00754), Tables 1-2: at equal model and batch, PPO > LoRA-PPO >=
Hydra-PPO >= J-Hydra-PPO in memory, and Hydra-PPO's latency per sample below LoRA-PPO's. Every
variant here runs the same `ppo_step` (minilm/stages/ppo.py) on the same model shape (random weights) and the same prompts: B prompts of P tokens,
exactly N sampled tokens each (no stop token, so all variants process the same token count),
`ppo_epochs` passes in minibatches of `minibatch_size`. SFT, the paper's reference line, is full
fine-tuning of one model on the same B sequences of P + N tokens, in the same minibatches.

How memory is measured:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, around the step (weights,
  gradients, optimizer state, activations, KV cache, temporaries: everything the allocator holds).
- CPU: there is no allocator counter, so `LiveBytes` (a TorchDispatchMode) sees every op's output,
  counts the bytes of each new storage once, and subtracts them when the last tensor on that
  storage is garbage-collected (weakref.finalize). Weights and any tensor created before the
  measurement are counted from the start (or their first use) to the end. This covers weights,
  gradients (the backward ops go through the mode too), AdamW's moments, activations saved for
  backward, the KV cache and temporaries; it misses allocator slack and memory outside tensors,
  so it is a lower bound on what the process would need.
Latency is measured separately, without the counter (its bookkeeping slows every op): the median
of --repeats timed steps after one untimed warm-up, divided by B. On a shared CPU it is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from minilm.config import build, get_preset
from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.post.chat import TurnClose
from minilm.post.heads import HydraModel
from minilm.post.ppo_models import VARIANTS, build_models
from minilm.post.ppo import make_kl_controller
from minilm.stages.ppo import PPOConfig, ppo_step

PAPER = ("paper (LLaMA-7B, StackExchange, Table 1): PPO 220 GB (estimate), LoRA-PPO 68.0 GB / 18.75 s, "
         "Hydra-PPO 71.1 GB / 6.47 s, J-Hydra-PPO 67.9 GB / 5.01 s per sample")


@dataclass
class BenchConfig:
    preset: str = "tiny"
    batch_size: int = 8
    prompt_len: int = 32
    new_tokens: int = 32
    minibatch_size: int = 4
    ppo_epochs: int = 2
    lora_r: int = 8
    repeats: int = 3
    device: str = "cpu"
    png: str = ""


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages while active, and their peak (CPU memory accounting)."""

    def __init__(self, tensors=()):
        super().__init__()
        self.refs, self.nbytes, self.live, self.peak = {}, {}, 0, 0
        for t in tensors:                  # pre-existing (weights): live for the whole measurement
            self._add(t, pinned=True)

    def _add(self, t, pinned=False):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:                       # empty tensor
            return
        if key not in self.refs:
            self.refs[key], self.nbytes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        if not pinned:                     # pinned ones are never released: no finalizer
            weakref.finalize(t, self._release, key)

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # inputs made before the measurement (e.g. prompts) join as pinned on first use
        tree_map(lambda t: self._add(t, pinned=True) if isinstance(t, torch.Tensor)
                 and t.untyped_storage().data_ptr() not in self.refs else None, (args, kwargs))
        out = func(*args, **(kwargs or {}))
        tree_map(self._add, out)
        return out


def make_variant(variant: str, cfg: BenchConfig, model_cfg):
    """(models, PPOConfig): random weights, the same for every variant (seeded)."""
    torch.manual_seed(0)
    ppo_cfg = build(PPOConfig, batch_size=cfg.batch_size, minibatch_size=cfg.minibatch_size, ppo_epochs=cfg.ppo_epochs,
                        max_new_tokens=cfg.new_tokens, lora_r=cfg.lora_r, lr=1e-4, warmup_steps=0)
    reward = HydraModel(Phi3(model_cfg), heads=("reward",))
    sft = Phi3(model_cfg) if variant in ("ppo", "lora") else None
    return build_models(variant, ppo_cfg.lora, reward, sft).to(cfg.device), ppo_cfg


def ppo_runner(variant, cfg, model_cfg, prompts):
    models, ppo_cfg = make_variant(variant, cfg, model_cfg)
    optimizer, kl_ctl = make_optimizer(models, ppo_cfg.optim), make_kl_controller(ppo_cfg)
    # no stop token (every reply runs to N tokens); the reward reads each reply closed by two stand-in ids
    close = TurnClose(ids=(0, 1), specials=())
    return models, lambda: ppo_step(models, prompts, ppo_cfg, optimizer, kl_ctl, pad_id=0, close=close)


def sft_runner(cfg, model_cfg, prompts):
    """Full fine-tuning of one model on the same B sequences of P + N tokens, same minibatches."""
    torch.manual_seed(0)
    model = Phi3(model_cfg).to(cfg.device)
    optimizer = make_optimizer(model, build(PPOConfig, lr=1e-4).optim)
    n = len(prompts)
    tokens = torch.randint(1, model_cfg.vocab_size, (n, cfg.prompt_len + cfg.new_tokens), device=cfg.device)

    def step():
        for _ in range(cfg.ppo_epochs):
            for rows in torch.arange(n).split(cfg.minibatch_size):
                _, loss = model(tokens[rows], targets=tokens[rows])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return model, step


def peak_bytes(model, step, device: str) -> int:
    """Peak memory of two steps (the second one has the optimizer state from the start)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(), step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with LiveBytes([*model.parameters(), *model.buffers()]) as counter:
        step(), step()
    return counter.peak


def seconds_per_sample(step, n: int, repeats: int, device: str) -> float:
    step()                                                  # warm-up (optimizer state, caches)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n


def static_bytes(model) -> tuple[int, int]:
    """(bytes of all unique weights, bytes of trainable weights)."""
    seen = {p.data_ptr(): p for p in model.parameters()}
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return size(seen.values()), size(p for p in seen.values() if p.requires_grad)


def measure(cfg: BenchConfig, model_cfg) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, model_cfg.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=gen).tolist()
    rows = []
    for name in ("sft", *VARIANTS):
        def make_runner():
            return sft_runner(cfg, model_cfg, prompts) if name == "sft" else \
                ppo_runner(name, cfg, model_cfg, prompts)
        model, step = make_runner()
        weights, trainable = static_bytes(model)
        peak = peak_bytes(model, step, cfg.device)
        del model, step
        model, step = make_runner()                               # fresh, uninstrumented, for timing
        sec = seconds_per_sample(step, cfg.batch_size, cfg.repeats, cfg.device)
        rows.append({"name": name, "weights_mb": weights / 1e6, "trainable_mb": trainable / 1e6,
                     "peak_mb": peak / 1e6, "sec_per_sample": sec})
        del model, step
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    sft = rows[0]
    print(f"{'':8s} {'weights MB':>10s} {'trainable MB':>12s} {'peak MB':>9s} {'x SFT':>6s} "
          f"{'ms/sample':>10s} {'x LoRA-PPO':>10s}")
    lora = next(r for r in rows if r["name"] == "lora")
    for r in rows:
        print(f"{r['name']:8s} {r['weights_mb']:10.2f} {r['trainable_mb']:12.2f} {r['peak_mb']:9.2f} "
              f"{r['peak_mb'] / sft['peak_mb']:6.2f} {1e3 * r['sec_per_sample']:10.2f} "
              f"{r['sec_per_sample'] / lora['sec_per_sample']:10.2f}")
    order = [r["name"] for r in sorted(rows[1:], key=lambda r: -r["peak_mb"])]
    print(f"measured memory order: {' > '.join(order)}; paper's: ppo > lora >= hydra >= jhydra, "
          f"lora below SFT")
    print(PAPER)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(names, [r["peak_mb"] for r in rows])
    axes[0].axhline(rows[0]["peak_mb"], ls="--", c="k", lw=1)
    axes[0].set(title="peak memory of one PPO step (MB)")
    axes[1].bar(names[1:], [1e3 * r["sec_per_sample"] for r in rows[1:]])
    axes[1].set(title="latency per sample (ms)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in vars(BenchConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    model_cfg = get_preset(cfg.preset)
    print(f"preset {cfg.preset}, device {cfg.device}, batch {cfg.batch_size} x ({cfg.prompt_len} prompt + "
          f"{cfg.new_tokens} sampled) tokens, minibatch {cfg.minibatch_size}, {cfg.ppo_epochs} PPO epochs, "
          f"LoRA r={cfg.lora_r}, fp32")
    rows = measure(cfg, model_cfg)
    print_table(rows)
    if cfg.png and plot(rows, cfg.png):
        print(f"wrote {cfg.png}")
    return rows


if __name__ == "__main__":
    main()
