"""Attention benchmark: minilm's kernel vs PyTorch SDPA vs naive matmul-softmax-matmul, one run.

    python benchmarks/attention.py                     # CPU: every training shape, float32 and bf16
    python benchmarks/attention.py --shapes tiny --repeat 5 --dtypes float32
    python benchmarks/attention.py --shapes small T1024 T2048 --dtypes bfloat16   # on a GPU: + sdpa-flash

For each shape (causal, grouped-query as in the presets) and each implementation it measures
  - forward time and forward+backward time: the fastest (and, for forward+backward, the median)
    of --repeat runs after a warm-up (the fastest run is the one least disturbed by other work);
  - peak memory of forward+backward. On CUDA: torch.cuda.max_memory_allocated. On CPU there is no
    allocator counter, so each (implementation, shape) runs in a fresh subprocess on Linux: we
    reset the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`), run the call, and report
    the peak (VmHWM) minus the resident memory just before it. Large tensors are mmap'd and
    unmapped by glibc, so RSS follows what is really held.
and prints each time as a ratio to SDPA's (>1: faster than SDPA) and to naive's.
The naive version materialises the (T, S) score matrix; SDPA on CPU is a fused flash-style kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from minilm import ops
from minilm.ops.reference import attention_reference

# name -> (B, H, H_kv, T, D): every shape the presets train at on a CPU (pretraining at the tiny
# and small presets' batch and context; the laptop speedrun's SFT, and its DPO/Hydra batches of
# chosen + rejected replies), then longer sequences no CPU preset trains at
SHAPES = {
    "tiny": (16, 4, 2, 256, 32),
    "sft": (32, 4, 2, 192, 32),
    "dpo": (32, 4, 2, 160, 32),
    "small": (8, 8, 4, 512, 64),
    "T1024": (4, 8, 4, 1024, 64),
    "T2048": (2, 8, 4, 2048, 64),
}
TRAINING_SHAPES = ("tiny", "sft", "dpo", "small")


def implementations(device: str) -> dict:
    ours = "cuda" if device == "cuda" else "cpu"
    impls = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "naive": lambda q, k, v: attention_reference(q, k, v, causal=True),
    }
    if device == "cuda":   # SDPA pinned to its FlashAttention-2 backend, the GPU peer to beat
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        impls["sdpa-flash"] = flash
    if ours in ops.available_backends():
        impls["minilm"] = lambda q, k, v: ops.attention(q, k, v, causal=True, backend=ours)
    return impls


def make_inputs(shape, device, dtype):
    b, h, h_kv, t, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(device, dtype).requires_grad_()
               for n in (h, h_kv, h_kv))
    return q, k, v


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_times(fn, device, repeat) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_impl(impl, shape, device, dtype, repeat):
    q, k, v = make_inputs(shape, device, dtype)
    dout = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            impl(q, k, v)

    def forward_backward():
        impl(q, k, v).backward(dout)

    return min(run_times(forward, device, repeat)), run_times(forward_backward, device, repeat)


def peak_memory_mb(name, shape_name, device, dtype) -> float:
    """Peak memory of one forward+backward, in MiB (see the module docstring for the method)."""
    if device == "cuda":
        q, k, v = make_inputs(SHAPES[shape_name], device, dtype)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        implementations(device)[name](q, k, v).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--memory-worker", name, shape_name, "--dtypes", str(dtype).split(".")[1]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_worker(name, shape_name, dtype):
    q, k, v = make_inputs(SHAPES[shape_name], "cpu", dtype)
    impl = implementations("cpu")[name]
    impl(q[:, :, :8], k[:, :, :8], v[:, :, :8]).sum().backward()  # load lazily initialised code first
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    impl(q, k, v).sum().backward()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - base) / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: the training shapes on a CPU, all shapes on a GPU")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="default: float32 and bfloat16 on a CPU, bfloat16 on a GPU (float16 also works there)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [getattr(torch, d) for d in args.dtypes or (["bfloat16"] if device == "cuda" else ["float32", "bfloat16"])]
    shapes = args.shapes or (list(SHAPES) if device == "cuda" else list(TRAINING_SHAPES))
    if args.memory_worker:
        return memory_worker(*args.memory_worker, dtypes[0])

    impls = implementations(device)
    print(f"device {device}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min) "
          f"at start; attention backends: {', '.join(impls)}")
    if "minilm" not in impls:
        print("minilm's kernel is not built here: only SDPA and naive are measured")
    print(f"{'shape (B,H,Hkv,T,D)':25s} {'dtype':8s} {'impl':7s} {'fwd ms':>7s} {'f+b ms min/med':>15s} "
          f"{'peak MiB':>8s} {'fwd vs sdpa':>11s} {'f+b vs sdpa':>11s} {'(median)':>8s} {'f+b vs naive':>12s}")
    for dtype in dtypes:
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            rows = {n: time_impl(fn, shape, device, dtype, args.repeat) for n, fn in impls.items()}
            sdpa_fwd, sdpa_fb = rows["sdpa"][0], rows["sdpa"][1]
            for name, (fwd, fb) in rows.items():
                mem = float("nan") if args.no_memory else peak_memory_mb(name, shape_name, device, dtype)
                print(f"{shape_name + ' ' + str(shape):25s} {str(dtype)[6:]:8s} {name:7s} {fwd * 1e3:7.2f} "
                      f"{min(fb) * 1e3:7.2f}/{statistics.median(fb) * 1e3:7.2f} {mem:8.1f} {sdpa_fwd / fwd:10.2f}x "
                      f"{min(sdpa_fb) / min(fb):10.2f}x {statistics.median(sdpa_fb) / statistics.median(fb):7.2f}x "
                      f"{min(rows['naive'][1]) / min(fb):11.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at end")


if __name__ == "__main__":
    main()
