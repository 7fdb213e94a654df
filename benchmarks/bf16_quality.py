"""Does bf16 autocast cost quality? The tiny pretraining run under fp32 and under bf16, over seeds.

    python benchmarks/bf16_quality.py                         # seeds 1337 1338 1339, 1,600 steps each
    python benchmarks/bf16_quality.py --seeds 1 2 --max-steps 200 --data-dir runs/data/pipeline

Each run is exactly `minilm train --preset tiny --seed S --dtype D` on the default pipeline's two
phases (built first when --data-dir has none). Under bf16 autocast the matmuls round their inputs
to 8 bits of mantissa; the weights, AdamW's state, the attention and masking kernels' sums and the
loss stay float32. What that costs is measured where the course measures pretraining: the final
validation loss on held-out phase-1 windows.

Seeds change the initial weights and the batch order, so two fp32 runs differ too; a bf16 run is
only worse if it is further from its fp32 twin than the seeds are from each other. The table gives
each seed's pair, the mean difference with a t interval over seeds, and the seed spread under fp32.
The check passes when every |bf16 - fp32| is within --tolerance nats (0.05 by default: 1.2% of the
final loss of about 4.1 nats). The seconds columns are wall time, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from minilm.stages.pretrain import train, train_config

T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}   # Student t, two-sided 95%, by degrees of freedom


def ensure_data(data_dir: Path) -> None:
    """The default pipeline's output in data_dir (phase1/ and phase2/), built once."""
    if not (data_dir / "phase1").exists():
        from data_prep.pipeline import main as pipeline
        pipeline(["--out", str(data_dir)])


def run(seed: int, dtype: str, data_dir: Path, max_steps: int, out_root: Path) -> dict:
    out = out_root / f"{dtype}-{seed}"
    cfg = train_config("tiny", data_dir=str(data_dir / "phase1"), phase2_dir=str(data_dir / "phase2"),
                       seed=seed, dtype=dtype, out_dir=str(out), resume=False,
                       **({"max_steps": max_steps} if max_steps else {}))
    t0 = time.time()
    summary = train(cfg)
    return {"seed": seed, "dtype": dtype, "val_loss": summary["val_loss"], "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--data-dir", default="runs/data/pipeline", help="the pipeline's output (built when missing)")
    p.add_argument("--max-steps", type=int, default=0, help="0: the tiny preset's 1,600")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest |bf16 - fp32| final val loss, nats")
    p.add_argument("--json", default="", help="also write the runs here")
    args = p.parse_args()

    print(f"load average {os.getloadavg()[0]:.2f}, {len(args.seeds)} seeds x fp32/bf16")
    data_dir = Path(args.data_dir)
    ensure_data(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(s, d, data_dir, args.max_steps, Path(tmp)) for s in args.seeds for d in ("fp32", "bf16")]
    loss = {(r["seed"], r["dtype"]): r["val_loss"] for r in runs}
    secs = {(r["seed"], r["dtype"]): r["seconds"] for r in runs}
    diffs = [loss[s, "bf16"] - loss[s, "fp32"] for s in args.seeds]

    print("\n| seed | fp32 val loss | bf16 val loss | bf16 - fp32 | fp32 s | bf16 s |\n|---:|---:|---:|---:|---:|---:|")
    for s, d in zip(args.seeds, diffs):
        print(f"| {s} | {loss[s, 'fp32']:.4f} | {loss[s, 'bf16']:.4f} | {d:+.4f} | "
              f"{secs[s, 'fp32']:.0f} | {secs[s, 'bf16']:.0f} |")
    mean = statistics.mean(diffs)
    if len(diffs) > 1:
        half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        fp32 = [loss[s, "fp32"] for s in args.seeds]
        print(f"\nmean bf16 - fp32: {mean:+.4f} nats, 95% t interval [{mean - half:+.4f}, {mean + half:+.4f}]; "
              f"fp32 spread over seeds (max - min): {max(fp32) - min(fp32):.4f}")
    worst = max(abs(d) for d in diffs)
    print(f"largest |bf16 - fp32|: {worst:.4f} nats, tolerance {args.tolerance}: "
          f"{'PASS' if worst <= args.tolerance else 'FAIL'}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
