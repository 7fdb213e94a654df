"""Math: the skill ladder's harder rungs as an environment, one whole-number answer (LTC's GSM8K task).

    from minilm.agents.envs import make_env
    env = make_env("math")
    obs = env.reset(seed=0)           # "Your task is to: solve the problem ... <question>"
    env.step("think[23 + 8 = 31]")    # "OK." (recorded, no effect)
    env.step("answer[31]")            # "Correct." reward 1.0, done

Follows GSM8K's shape (Cobbe et al. 2021, arXiv 2110.14168; LTC arXiv 2310.01444 scores the final
`#### N`): several arithmetic steps and one integer answer. No GSM8K ships offline, so problems
come from the skill ladder (data_prep/ladder.py), rungs RUNGS in equal shares: chains of 3-4 sums,
unit conversions and GSM8K-shaped stories. The rungs a small SFT model half-solves leave LTC room
to act; a GSM8K-only environment left the laptop model at 2% success, where no method can learn.
The file is named math_env.py so that it can never be mistaken for the standard `math` module.
Deviations: an episode is at most six actions (think[...] any number of times, then one
answer[N]); the expert thinks one worked line of the ladder per action, ReAct-style. Split: the ladder's
own (data_prep.synthetic.split_of): the test split is the ladder's held-out problems, so neither
LTC nor its baseline ever trains on a question of the held-out ladder evaluation.
"""

from __future__ import annotations

import random
import re

from data_prep.ladder import ladder_problem
from data_prep.synthetic import split_of
from minilm.agents.envs.base import TextEnv

RUNGS = ("ops3", "ops4", "units", "word")   # the ladder's harder rungs (ops1-2 are solved after SFT)


class WordMath(TextEnv):
    name = "math"
    max_steps = 6                   # the longest rung has 4 worked lines: 4 thoughts + the answer

    def _new_task(self, rng: random.Random) -> str:
        wanted = "heldout" if self.split == "test" else "train"
        while True:                 # draw until a problem of this env's split comes up
            problem = ladder_problem(rng.choice(RUNGS), rng)
            if split_of(problem["id"]) == wanted:
                break
        steps = problem["worked"].split("\n")[:-1]      # the worked lines, without "The answer is N."
        self.task = {**problem, "steps": steps,
                     "solution": [f"think[{line}]" for line in steps] + [f"answer[{problem['answer']}]"]}
        self.thoughts: list[str] = []
        return f"Your task is to: solve the problem; reply answer[N].\n{problem['question']}"

    def _act(self, action: str) -> tuple[str, bool, bool]:
        if m := re.fullmatch(r"think\[(.*)\]", action, re.S):
            self.thoughts.append(m[1])   # recorded for inspection; it never changes the outcome
            return "OK.", False, False
        if m := re.fullmatch(r"answer\[\s*(-?[\d,]+(?:\.0+)?)\s*\]", action):
            value = int(m[1].replace(",", "").split(".")[0])   # "1,200" and "57.0" are accepted
            ok = value == self.task["answer"]
            return ("Correct." if ok else "Incorrect."), ok, True
        return "Nothing happens: valid actions are think[...] and answer[N], N a whole number.", False, False

    def expert_actions(self) -> list[str]:
        return list(self.task["solution"])
