"""Held-out ladder accuracy of checkpoints, and each one's gain over a base checkpoint with its interval.

    python benchmarks/ladder_gain.py runs/speedrun-laptop/sft/checkpoint runs/dpo-lr2e-4/checkpoint
    python benchmarks/ladder_gain.py BASE A B C --per-rung 100      # more items, a narrower interval

The first checkpoint is the base (the SFT model); every later one gets the difference of its accuracy
from the base's on the SAME held-out items, with a 95% paired bootstrap interval
(minilm.post.winrate.paired_gain). This is what the speedrun's eval stage computes
(minilm/eval/ladder.py), alone and in seconds a model, so that a learning-rate sweep or an ablation
of one stage can be read without rerunning the whole suite. Lessons 07-10 quote its tables.

The interval covers the sampling of items, not of training seeds: run the stage with several
--seed values and compare those rows to see the seed spread.
"""

from __future__ import annotations

import argparse
import time

from minilm.eval.ladder import ladder_items, ladder_metrics
from minilm.eval.suite import judged_replies, load_for_eval
from minilm.post.winrate import paired_gain


def ladder_scores(path: str, items: list[dict], max_new_tokens: int, batch_size: int) -> list[int]:
    """0/1 per held-out item: the checkpoint's greedy reply judged by its last number."""
    model, tokenizer = load_for_eval(path)
    return [int(j["correct"]) for j in judged_replies(model, tokenizer, items, max_new_tokens, batch_size)]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="the base (SFT) checkpoint first, then the ones to compare")
    ap.add_argument("--per-rung", type=int, default=50, help="held-out problems per rung (the suite's n_ladder)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="reply budget (the suite's ladder_new_tokens)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="which held-out items (the suite's seed)")
    args = ap.parse_args(argv)
    items = ladder_items(args.per_rung, args.seed)
    rows, base = [], None
    for path in args.checkpoints:
        start = time.perf_counter()
        scores = ladder_scores(path, items, args.max_new_tokens, args.batch_size)
        row = {"checkpoint": path, **ladder_metrics(scores, items), "seconds": time.perf_counter() - start}
        if base is not None:
            row["gain"], row["gain_lo"], row["gain_hi"] = paired_gain(scores, base, seed=args.seed)
        base = base or scores
        rows.append(row)
    rungs = [k for k in rows[0] if k.startswith("ladder_") and k not in ("ladder_acc", "ladder_acc_mid")]
    print(f"| checkpoint | ladder_acc | mid | {' | '.join(r[len('ladder_'):] for r in rungs)} | gain [95%] |")
    print("|---|" + "---:|" * (len(rungs) + 3))
    for row in rows:
        gain = f"{row['gain']:+.3f} [{row['gain_lo']:+.3f}, {row['gain_hi']:+.3f}]" if "gain" in row else "base"
        cells = " | ".join(f"{row[r]:.2f}" for r in rungs)
        print(f"| {row['checkpoint']} | {row['ladder_acc']:.3f} | {row['ladder_acc_mid']:.3f} | {cells} | {gain} |")
    return rows


if __name__ == "__main__":
    main()
