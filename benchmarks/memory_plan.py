"""The memory plan (minilm/memory.py) against the measured peak of real training steps on CPU.

    python benchmarks/memory_plan.py          # tiny and small presets, fp32, ~1 minute
    python benchmarks/memory_plan.py --phi3   # also print the phi3-mini plans (no measurement)

Each (preset, batch, seq) runs in a fresh subprocess: build the model and AdamW, then reset the
kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`) and take two training steps (forward,
backward, optimizer step; the first allocates Adam's moments). The measured peak is VmHWM minus
the resident memory before the model was built, after one warm-up step on a 16-token batch
(oneDNN, OpenMP and autograd allocate their own buffers on first use; they are not the model's). With MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB
glibc maps every tensor with mmap and unmaps it when freed, so resident memory follows what
PyTorch really holds. Printed: the plan's total,
the measured peak and their ratio; the plan should be within about 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from minilm.config import get_preset
from minilm.memory import GIB, plan_memory
from minilm.model import Phi3

CASES = [("tiny", 16, 256), ("tiny", 64, 256), ("small", 4, 512), ("small", 8, 512)]
PHI3 = [(dict(), "full fine-tuning"), (dict(lora_r=16), "LoRA r=16")]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(preset: str, batch: int, seq: int) -> None:
    torch.manual_seed(0)
    _warm_up(preset)    # libraries allocate their own buffers on first use; that is not the model's
    base = _status_kib("VmRSS")
    model = Phi3(get_preset(preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=False)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")            # VmHWM := VmRSS now
    for _ in range(2):
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"peak": (_status_kib("VmHWM") - base) * 1024}))


def _warm_up(preset: str) -> None:
    """One training step of the same model on a tiny batch, then everything freed."""
    model = Phi3(get_preset(preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=False)
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    model(idx, idx)[1].backward()
    optimizer.step()


def measured_peak(preset: str, batch: int, seq: int) -> float:
    # a fixed mmap threshold: every block over 128 KiB is mapped and unmapped on free, so resident
    # memory follows what is held (glibc's default threshold rises after frees and keeps freed
    # blocks of up to 32 MiB on its heap, which counts them as resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--worker", preset, str(batch), str(seq)],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phi3", action="store_true", help="also print phi3-mini's plans on 1 and 8 x 80 GB")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
    torch.set_num_threads(1)
    rows = []
    print("| preset | batch x seq | planned GiB | measured peak GiB | measured / planned |")
    print("|---|---|---:|---:|---:|")
    for preset, batch, seq in CASES:
        plan = plan_memory(get_preset(preset), batch, seq, dtype="fp32")
        peak = measured_peak(preset, batch, seq)
        rows.append({"preset": preset, "batch": batch, "seq": seq, "planned": plan.total, "measured": peak})
        print(f"| {preset} | {batch} x {seq} | {plan.total / GIB:.3f} | {peak / GIB:.3f} | {peak / plan.total:.2f} |")
    if args.phi3:
        print("\nphi3-mini (3.8B), bf16 activations, seq 4096, batch 1 per GPU, activation checkpointing:")
        print("| setting | 1 x 80 GB | 8 x 80 GB (FSDP) |")
        print("|---|---:|---:|")
        for extra, name in PHI3:
            one = plan_memory(get_preset("phi3-mini"), 1, 4096, checkpointing=True, **extra)
            eight = plan_memory(get_preset("phi3-mini"), 1, 4096, checkpointing=True, world=8, fsdp=True, **extra)
            print(f"| {name} | {one.total / GIB:.1f} GiB | {eight.total / GIB:.1f} GiB |")
    return rows


if __name__ == "__main__":
    main()
