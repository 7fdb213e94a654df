"""The held-out skill ladder in the evaluation suite: accuracy per rung, and each model's gain over SFT.

    from minilm.eval.ladder import ladder_items, ladder_metrics, ladder_gains
    items = ladder_items(n_per_rung=50, seed=0)        # held-out problems, rung by rung
    correct = [...]                   # 0 or 1 per item: minilm/eval/suite.py judges the greedy replies
    ladder_metrics(correct, items)    # {"ladder_acc", "ladder_acc_mid", "ladder_ops1", ..., "ladder_word"}
    ladder_gains(rows)                # adds ladder_gain, ladder_gain_lo, ladder_gain_hi after "sft"

Items come from data_prep.ladder's held-out split, which no pretraining document or training
conversation contains. A greedy reply is correct when its LAST number is the answer (GSM8K's rule,
as AnswerOracle judges worked replies); a reply cut by max_new_tokens can still be right.
ladder_acc averages every item (rungs in equal shares); ladder_acc_mid averages the MIDDLE rungs,
the ones a method has room to move.

A model's gain over SFT is the difference of the two accuracies on the same items, with a 95%
paired bootstrap interval (minilm.post.winrate.paired_gain). An interval that excludes 0 means the
item sample supports the gain; it says nothing about training-seed variation, which
benchmarks/ measures over several seeds.
"""

from __future__ import annotations

from data_prep.ladder import LADDER, MIDDLE, ladder_conversations
from minilm.post.winrate import paired_gain

GAIN_BASE = "sft"   # the row every gain is measured against


def ladder_items(n_per_rung: int, seed: int = 0) -> list[dict]:
    """n_per_rung held-out conversations of every rung, in LADDER order (a fixed list per seed)."""
    items = ladder_conversations(n_per_rung * len(LADDER), seed, split="heldout")
    return sorted(items, key=lambda c: (LADDER.index(c["kind"]), c["id"]))


def ladder_metrics(correct: list[int], items: list[dict]) -> dict:
    """Accuracy overall, over the middle rungs, and per rung (keys ladder_<rung>)."""
    if len(correct) != len(items) or not items:
        raise ValueError(f"need one score per item, got {len(correct)} scores for {len(items)} items")
    by_rung: dict[str, list[int]] = {}
    for c, item in zip(correct, items):
        by_rung.setdefault(item["kind"], []).append(c)
    out = {f"ladder_{r}": sum(v) / len(v) for r, v in by_rung.items()}
    mid = [c for r in MIDDLE for c in by_rung.get(r, [])]
    out["ladder_acc"] = sum(correct) / len(correct)
    out["ladder_acc_mid"] = sum(mid) / len(mid) if mid else None
    return out


def ladder_gains(rows: dict[str, dict], base: str = GAIN_BASE, seed: int = 0) -> dict[str, dict]:
    """Each row after `base` (in dict order) gets ladder_gain / _lo / _hi from its per-item scores
    ("ladder_correct") against the base row's; rows without scores, and the base itself, get None."""
    names = list(rows)
    base_scores = rows.get(base, {}).get("ladder_correct")
    after = names[names.index(base) + 1:] if base in rows else []
    out = {}
    for name, row in rows.items():
        gain = dict.fromkeys(("ladder_gain", "ladder_gain_lo", "ladder_gain_hi"))
        mine = row.get("ladder_correct")
        if name in after and base_scores and mine and len(mine) == len(base_scores):
            g, lo, hi = paired_gain(mine, base_scores, seed=seed)
            gain = {"ladder_gain": g, "ladder_gain_lo": lo, "ladder_gain_hi": hi}
        out[name] = {**row, **gain}
    return out
