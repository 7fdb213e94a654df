"""Math: GSM8K-like word problems with a final whole-number answer (LTC's numerical-reasoning task).

    from minilm.agents.envs import make_env
    env = make_env("math")
    obs = env.reset(seed=0)           # "Your task is to: solve the problem ... <question>"
    env.step("think[9*4=36, 36+21=57]")   # "OK." (recorded, no effect)
    env.step("answer[57]")                # "Correct." reward 1.0, done

Follows GSM8K's shape (Cobbe et al. 2021, arXiv 2110.14168; LTC arXiv 2310.01444 scores the final
`#### N`): several arithmetic steps and one integer answer. No GSM8K ships offline, so problems
come from data_prep.synthetic.word_problem_steps, whose answers are computed.
The file is named math_env.py so that it can never be mistaken for the standard `math` module.
Deviations: an episode is at most a few actions (think[...] any number of times, then one
answer[N]); the expert's thought is the computed steps written compactly ("9*4=36, ..."). Split:
a problem belongs to the test split iff a hash of its text says so (base.content_split); reset
draws problems from the seed's generator until one of its split comes up, so the splits share
no problem.
"""

from __future__ import annotations

import random
import re

from data_prep.synthetic import word_problem_steps
from minilm.agents.envs.base import TextEnv, content_split


class WordMath(TextEnv):
    name = "math"
    max_steps = 4

    def _new_task(self, rng: random.Random) -> str:
        while True:                 # draw until a problem of this env's split comes up
            question, rows, worked, answer = word_problem_steps(rng)
            if content_split(question) == self.split:
                break
        # the expert's thought: every computed step, compactly ("9*4=36, 36+21=57")
        thought = ", ".join(f"{a}{op}{b}={r}" for a, op, b, r in rows)
        self.task = {"question": question, "answer": answer, "steps": rows, "worked": worked,
                     "solution": [f"think[{thought}]", f"answer[{answer}]"]}
        self.thoughts: list[str] = []
        return f"Your task is to: solve the problem; reply answer[N].\n{question}"

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
