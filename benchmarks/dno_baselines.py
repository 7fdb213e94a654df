"""DNO against the paper's baselines at equal prompts and oracle budget (DNO paper, Table 1-style).

    OMP_NUM_THREADS=1 python benchmarks/dno_baselines.py --n-prompts 150 --out runs/dno-baselines

Every variant starts from the same SFT checkpoint, sees the same T x n_prompts train prompts and
the same K samples per prompt, and is judged by the same held-out verifier on the same test
prompts (minilm/stages/dno.py). Rows: SFT on positives, offline DPO (one fixed pair set from
the SFT model, several epochs), SPIN-style (teacher always chosen, no oracle), DNO-Restrictive
(teacher > student only), DNO with a fixed SFT reference, DNO without the large-margin filter,
DNO. Prints a markdown table of the final iterate of each (and writes it to OUT/baselines.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from minilm.post.winrate import winrate_table
from minilm.stages.dno import dno_config, run_dno

VARIANTS = {
    "DNO": dict(),
    "DNO, all pairs (no large-margin filter)": dict(large_margin=False),
    "DNO, fixed SFT reference": dict(reference="sft"),
    "DNO-Restrictive (teacher > student only)": dict(pairs_mode="restrictive"),
    "SPIN-style (teacher always chosen)": dict(pairs_mode="spin"),
    "SFT on positives": dict(loss="sft"),
    "offline DPO, 3 epochs on one pair set": dict(iterations=1, epochs=3.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default="runs/sft-tiny/checkpoint")
    ap.add_argument("--out", default="runs/dno-baselines")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--n-prompts", type=int, default=150)
    ap.add_argument("--only", default="", help="comma-separated variant numbers (0-based) to run")
    ap.add_argument("--lr", type=float, default=None, help="every variant's learning rate (default: the tiny preset's)")
    args = ap.parse_args()
    rows = []
    picks = [int(i) for i in args.only.split(",") if i.strip()] or range(len(VARIANTS))
    for i, (name, kw) in enumerate(VARIANTS.items()):
        if i not in picks:
            continue
        # offline DPO: all T x n_prompts prompts in its single iteration, so the prompts match
        n = args.n_prompts * (args.iterations if kw.get("iterations") == 1 else 1)
        its = kw.pop("iterations", args.iterations)
        t0 = time.time()
        s = run_dno(dno_config("tiny", init=args.init, out_dir=f"{args.out}/v{i}", iterations=its,
                               n_prompts=n, **kw, **({"lr": args.lr} if args.lr else {})))
        last = s["rows"][-1]
        rows.append({"name": name, **{k: last[k] for k in ("vs_sft", "vs_teacher", "test_correct",
                                                              "length", "oracle_calls", "n_train_pairs")},
                     "seconds": round(time.time() - t0)})
        print(winrate_table(rows[-1:]), flush=True)
    table = winrate_table(rows)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "baselines.md").write_text(table + "\n")
    Path(args.out, "baselines.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
