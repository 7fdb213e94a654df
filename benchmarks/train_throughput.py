"""Training throughput: tokens/s of a training step, and how much of the machine's matmul speed it gets.

    python benchmarks/train_throughput.py                          # tiny and small presets
    python benchmarks/train_throughput.py --presets tiny --steps 20 --batch-size 8

A step is what minilm/stages/pretrain.py does for one micro-batch: forward, loss, backward, gradient clipping
and AdamW, in float32 on CPU and under bf16 autocast on a GPU that has it (minilm.runtime decides).
The inputs are random tokens, which cost the same as text. The model's work per token is
`Phi3.flops_per_token(seq_len)` (6 per weight plus attention), so achieved FLOP/s = that x tokens/s.
Dividing by the FLOP/s of one large `torch.mm` (2048^2 float32 on CPU, 8192^2 in the autocast dtype
on GPU), timed in the same run with the same threads, gives a ratio that means the same on any
machine: the share of peak matmul speed that training reaches. What it does not reach goes to
elementwise ops, attention's softmax, the optimizer and Python overhead, which weigh more in
smaller models.

Each time is the fastest of --steps timed runs after --warmup untimed ones (timeit's rule: the
fastest run is the one least disturbed by other work), for the step and the matmul alike. The load
average is printed so you can tell whether the machine was busy. On a busy CPU, OpenMP threads
wait for each other at every op; `--threads 1` then gives steadier figures.
"""

import argparse
import os
import time

import torch

from minilm.config import get_preset
from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.runtime import setup_runtime
from minilm.stages.pretrain import TrainConfig

DEFAULT_BATCH = {"tiny": 16, "small": 1}  # small: ~1 minute on a 2-core CPU


def best_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Fewest seconds of fn() over `steps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(rt, n: int, steps: int = 10) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in the dtype the training step's matmuls use."""
    dtype = rt.autocast_dtype or torch.float32
    a = torch.randn(n, n, device=rt.device, dtype=dtype)
    b = torch.randn(n, n, device=rt.device, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: torch.mm(a, b), steps, warmup=2, device=rt.device)


def train_step_seconds(model: Phi3, batch_size: int, seq_len: int, steps: int, warmup: int, rt) -> float:
    """Seconds of one forward + backward + clip + AdamW step on a (batch_size, seq_len) batch."""
    optimizer = make_optimizer(model, TrainConfig().optim)
    tokens = torch.randint(model.config.vocab_size, (batch_size, seq_len + 1), device=rt.device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with rt.autocast():
            loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return best_time(step, steps, warmup, rt.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step for every preset (default: {DEFAULT_BATCH})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the chip has it natively), bf16, fp32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = setup_runtime(args.device, args.dtype)
    mm_n = 8192 if rt.device.type == "cuda" else 2048
    dtype = str(rt.autocast_dtype or torch.float32).replace("torch.", "")
    print(f"device {rt.device}, {dtype}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (1 min) at start")
    print(f"{'preset':8s} {'params':>7s} {'batch x seq':>11s} {'step ms':>8s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'mm GFLOP/s':>10s} {'of mm':>6s}")
    for name in args.presets:
        cfg = get_preset(name)
        torch.manual_seed(0)
        model = Phi3(cfg).to(rt.device)
        batch, seq_len = args.batch_size or DEFAULT_BATCH.get(name, 1), cfg.max_seq_len
        mm = matmul_flops(rt, mm_n)  # next to each preset, so both see the same machine load
        seconds = train_step_seconds(model, batch, seq_len, args.steps, args.warmup, rt)
        tokens_per_s = batch * seq_len / seconds
        flops = model.flops_per_token(seq_len) * tokens_per_s
        print(f"{name:8s} {model.num_params() / 1e6:6.1f}M {batch:>5d} x {seq_len:<4d} {seconds * 1e3:8.0f} "
              f"{tokens_per_s:9.0f} {flops / 1e9:8.1f} {mm / 1e9:10.1f} {flops / mm:6.1%}")
        del model
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at end")


if __name__ == "__main__":
    main()
