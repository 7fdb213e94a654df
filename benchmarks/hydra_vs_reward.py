"""Hydra-SFT against a separate reward model, and Hydra-SFT's loss weights against each other.

    python benchmarks/hydra_vs_reward.py --init runs/sft-tiny/checkpoint     # CPU, a few minutes
    python benchmarks/hydra_vs_reward.py --init runs/sft-tiny/checkpoint --weights 1:1,1:0.1,0.1:1

Without --weights: both models start from the same checkpoint and train on the same preference
pairs for the same steps at the same learning rate. The only difference is the LM loss on SFT
chats that Hydra-SFT adds (minilm/stages/hydra_sft.py); the separate reward model trains the
Bradley-Terry loss alone (minilm/stages/reward.py). Lesson 08 reads the table this prints.

With --weights W_LM:W_RM,...: one Hydra-SFT run per pair, loss = W_LM * LM + W_RM * BT, same init,
data, steps and lr; the table gives held-out pair accuracy (the reward head), BT and LM loss, and
the greedy chat reward (the LM head). 1:1 is our default; the paper's launch scripts use 1:0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import fields
from pathlib import Path

from minilm.stages.hydra_sft import HydraSFTConfig, hydra_sft_config, run_hydra_sft
from minilm.stages.reward import RewardConfig, reward_config, run_reward

KEYS = ("eval_accuracy", "eval_bt_loss", "eval_lm_loss")


def compare_reward_models(cfg: HydraSFTConfig) -> dict:
    """Hydra-SFT vs a separate reward model (same init, pairs, steps, lr): held-out accuracy and LM loss."""
    hydra = run_hydra_sft(cfg)
    shared = {f.name: getattr(cfg, f.name) for f in fields(RewardConfig) if hasattr(cfg, f.name)}
    separate = run_reward(reward_config(**{**shared, "lm_weight": 0.0,
                                           "out_dir": str(Path(cfg.out_dir) / "separate-rm")}))
    table = {"hydra_sft": {k: hydra["after"][k] for k in KEYS},
             "separate_rm": {k: separate["after"][k] for k in KEYS},
             "hydra_chat": {k: hydra["after"][k] for k in ("reward", "correct_rate", "end_rate")}}
    Path(cfg.out_dir, "comparison.json").write_text(json.dumps(table, indent=2))
    return table


def compare_loss_weights(cfg: HydraSFTConfig, weights: list[tuple[float, float]]) -> dict:
    """One Hydra-SFT run per (w_lm, w_rm), each in cfg.out_dir/lm{w_lm}-rm{w_rm}; everything else
    as cfg. Returns {"lm1.0-rm0.1": held-out pair accuracy, BT and LM loss, chat reward, ...}."""
    table = {}
    for w_lm, w_rm in weights:
        name = f"lm{w_lm}-rm{w_rm}"
        after = run_hydra_sft(dataclasses.replace(cfg, lm_weight=w_lm, rm_weight=w_rm,
                                                  out_dir=str(Path(cfg.out_dir) / name)))["after"]
        table[name] = {**{k: after[k] for k in KEYS}, "chat_reward": after["reward"]}
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.out_dir, "weights.json").write_text(json.dumps(table, indent=2))
    return table


def parse_weights(text: str) -> list[tuple[float, float]]:
    """"1:1,1:0.1" -> [(1.0, 1.0), (1.0, 0.1)]: (w_lm, w_rm) pairs."""
    try:
        return [(float(a), float(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--weights wants W_LM:W_RM pairs separated by commas, e.g. 1:1,1:0.1; got {text!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="runs/sft-tiny/checkpoint")
    p.add_argument("--out-dir", default="runs/bench/hydra-vs-reward")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--weights", default=None, help="W_LM:W_RM,...: compare Hydra-SFT loss weights instead")
    args = p.parse_args()
    cfg = hydra_sft_config("tiny", init=args.init, out_dir=args.out_dir, max_steps=args.max_steps, seed=args.seed)
    if args.weights:
        table = compare_loss_weights(cfg, parse_weights(args.weights))
    else:
        table = compare_reward_models(cfg)
    for name, row in table.items():
        print(f"{name:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
