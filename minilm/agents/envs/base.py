"""What the three LTC environments share: seeds and splits, step counting, the episode's end.

    env.reset(seed) -> first observation (with "Your task is to: ...")
    env.step(action) -> (observation, reward, done, info)

A subclass writes `_new_task(rng)` (build the task, return the first observation) and
`_act(action)` (apply one action, return (observation, success, finished)). This class counts
steps, ends the episode at success, at a final action (`finished`) or after `max_steps`, and pays
reward 1.0 only on success (the paper's -1 for failure is applied by the LTC loop, not here).

Splits: split "train" plays world seed = seed, split "test" plays world seed = SPLIT_OFFSET + seed,
and a seed must lie in [0, SPLIT_OFFSET), so the two splits never share a world seed. QA and math
also split by content (see their modules) so no question is in both.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod

from minilm import MinilmError

SPLITS = ("train", "test")
SPLIT_OFFSET = 1_000_000
TEST_FRACTION = 0.2


def world_seed(split: str, seed: int) -> int:
    """The seed that builds the world: disjoint ranges for the two splits."""
    if split not in SPLITS:
        raise MinilmError(f"unknown split {split!r}; use one of {SPLITS}")
    if not isinstance(seed, int) or not 0 <= seed < SPLIT_OFFSET:
        raise MinilmError(f"seed must be an int in [0, {SPLIT_OFFSET}), got {seed!r}")
    return seed if split == "train" else SPLIT_OFFSET + seed


def content_split(key: str) -> str:
    """'test' for about TEST_FRACTION of keys, else 'train': a pure function of the text."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64   # uniform in [0, 1)
    return "test" if h < TEST_FRACTION else "train"


class TextEnv(ABC):
    """Base class: subclasses set `name`, `max_steps` and write `_new_task` and `_act`."""

    name = "base"
    max_steps = 8

    def __init__(self, split: str = "train", max_steps: int | None = None):
        world_seed(split, 0)  # validates the split name
        self.split = split
        if max_steps is not None:
            self.max_steps = max_steps
        self.task: dict = {}
        self.steps, self.done, self.success, self.score = 0, True, False, 0.0
        self._started = False

    def reset(self, seed: int) -> str:
        self.seed = seed
        self.steps, self.done, self.success, self.score = 0, False, False, 0.0
        self._started = True
        return self._new_task(random.Random(world_seed(self.split, seed)))

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if not self._started:
            raise MinilmError(f"{self.name}: call reset(seed) before step()")
        if self.done:
            return "The episode is over. Call reset(seed).", 0.0, True, self._info()
        self.steps += 1
        obs, success, finished = self._act(" ".join(str(action).split()))   # whitespace collapsed
        self.success = success
        self.done = success or finished or self.steps >= self.max_steps
        if self.done and not (success or finished):
            obs += " Out of steps."
        return obs, (1.0 if success else 0.0), self.done, self._info()

    def _info(self) -> dict:
        # score: the env's own (F1 for QA) when it set one, else success as 0/1
        return {"success": self.success, "score": self.score if self.score else float(self.success),
                "steps": self.steps}

    def admissible_actions(self) -> list[str]:
        return []

    @abstractmethod
    def expert_actions(self) -> list[str]:
        """The scripted expert's actions from the current reset state (replaying them succeeds)."""

    @abstractmethod
    def _new_task(self, rng: random.Random) -> str:
        """Build this episode's world and task from `rng`; return the first observation."""

    @abstractmethod
    def _act(self, action: str) -> tuple[str, bool, bool]:
        """Carry out one normalised action: (observation, success, episode finished)."""
