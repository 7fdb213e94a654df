"""Hydra-SFT against a separate reward model: held-out pair accuracy, BT loss and LM loss side by side.

    python benchmarks/hydra_vs_reward.py --init runs/sft-tiny/checkpoint     # CPU, a few minutes

Both models start from the same checkpoint and train on the same preference pairs for the same
steps at the same learning rate. The only difference is the LM loss on SFT chats that Hydra-SFT
adds (lm_weight 1, minilm/stages/hydra_sft.py); the separate reward model trains the Bradley-Terry
loss alone (minilm/stages/reward.py). Lesson 08 reads the table this prints.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from minilm.stages.hydra_sft import HydraSFTConfig, hydra_sft_config, run_hydra_sft
from minilm.stages.reward import RewardConfig, reward_config, run_reward


def compare_reward_models(cfg: HydraSFTConfig) -> dict:
    """Hydra-SFT vs a separate reward model (same init, pairs, steps, lr): held-out accuracy and LM loss."""
    hydra = run_hydra_sft(cfg)
    shared = {f.name: getattr(cfg, f.name) for f in fields(RewardConfig) if hasattr(cfg, f.name)}
    separate = run_reward(reward_config(**{**shared, "lm_weight": 0.0,
                                           "out_dir": str(Path(cfg.out_dir) / "separate-rm")}))
    keys = ("eval_accuracy", "eval_bt_loss", "eval_lm_loss")
    table = {"hydra_sft": {k: hydra["after"][k] for k in keys},
             "separate_rm": {k: separate["after"][k] for k in keys},
             "hydra_chat": {k: hydra["after"][k] for k in ("reward", "correct_rate", "end_rate")}}
    Path(cfg.out_dir, "comparison.json").write_text(json.dumps(table, indent=2))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="runs/sft-tiny/checkpoint")
    p.add_argument("--out-dir", default="runs/bench/hydra-vs-reward")
    p.add_argument("--max-steps", type=int, default=100)
    args = p.parse_args()
    table = compare_reward_models(hydra_sft_config("tiny", init=args.init, out_dir=args.out_dir,
                                                   max_steps=args.max_steps))
    for name, row in table.items():
        print(f"{name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
