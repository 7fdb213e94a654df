"""The three LTC text environments and `make_env` (lesson 10; Wang et al. arXiv 2310.01444).

    from minilm.agents.envs import make_env
    env = make_env("household", split="test")
    obs = env.reset(seed=0)
    obs, reward, done, info = env.step(env.expert_actions()[0])

household (ALFWorld-like decision making), qa (HotpotQA-like two-hop QA with a search tool) and
math (GSM8K-like word problems). All follow the protocol in base.TextEnv: reset(seed), step(action),
admissible_actions(), task (gold information a teacher may see), expert_actions(), name, max_steps.
"""

from __future__ import annotations

from minilm import MinilmError
from minilm.agents.envs.base import SPLITS, TextEnv
from minilm.agents.envs.household import Household
from minilm.agents.envs.math_env import WordMath
from minilm.agents.envs.qa import MultiHopQA

ENVS = {"household": Household, "qa": MultiHopQA, "math": WordMath}


def make_env(name: str, split: str = "train", max_steps: int | None = None) -> TextEnv:
    """A fresh environment; call `reset(seed)` on it before `step`."""
    if name not in ENVS:
        raise MinilmError(f"unknown environment {name!r}; choose one of {sorted(ENVS)}")
    if split not in SPLITS:
        raise MinilmError(f"unknown split {split!r}; choose one of {SPLITS}")
    return ENVS[name](split=split, max_steps=max_steps)


__all__ = ["ENVS", "make_env", "TextEnv", "Household", "MultiHopQA", "WordMath"]
