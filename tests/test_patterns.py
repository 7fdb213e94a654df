"""LTC's communication patterns and episodes (minilm/agents/patterns.py, lessons/10_ltc.md).

A tiny fake environment following the Env protocol (notes: issue 8 interfaces) stands in for the
real ones, so these tests pin down the patterns whatever the environments do.
"""

import pytest
import torch

from conftest import tiny_config
from minilm.agents.patterns import (Analogue, Dialogue, Episode, Monologue, RolloutConfig,
                                    ScriptedTeacher, make_pattern, run_episodes)
from minilm.generate import token_logprobs

pytestmark = pytest.mark.lesson_10


class CountEnv:
    """'answer N' for N = seed % 5; the expert thinks once, then answers. Ends at an answer."""
    name, max_steps = "count", 3

    def reset(self, seed: int) -> str:
        self.n, self.t, self.done = seed % 5, 0, False
        self.task = {"answer": str(self.n), "goal": f"answer {self.n}"}
        return f"Your task is to: answer {self.n}."

    def step(self, action: str):
        self.t += 1
        if action.startswith("answer["):
            ok = action == f"answer[{self.n}]"
            return ("Correct." if ok else "Wrong."), float(ok), True, {"success": ok, "score": float(ok)}
        done = self.t >= self.max_steps
        return ("OK." + (" Out of steps." if done else "")), 0.0, done, {"success": False, "score": 0.0}

    def admissible_actions(self):
        return []

    def expert_actions(self):
        return [f"think[it is {self.n}]", f"answer[{self.n}]"]


@pytest.fixture(scope="module")
def tok(data_dir):
    from minilm.tokenizer import Tokenizer
    return Tokenizer.load(data_dir)


@pytest.fixture(scope="module")
def hydra():
    from minilm.model import Phi3
    from minilm.post.heads import HydraModel
    torch.manual_seed(0)
    model = HydraModel(Phi3(tiny_config(max_seq_len=256)), heads=("value",))
    torch.nn.init.normal_(model.heads["value"].weight, std=0.3)
    return model


def roles(ep):
    return [(m["role"], m["content"]) for m in ep.messages]


def test_monologue_is_the_agent_alone_with_the_environment(tok):
    env, ep, cfg = CountEnv(), Episode(seed=7), RolloutConfig()
    pattern = make_pattern("monologue")
    assert type(pattern) is Monologue
    pattern.begin(env, ep, tok, cfg)
    pattern.respond(env, ep, tok, "think[hmm]", cfg)
    pattern.respond(env, ep, tok, "answer[2]", cfg)
    assert roles(ep) == [("user", "Your task is to: answer 2."), ("user", "OK.")]
    assert ep.done and ep.success and env.t == 2


def test_dialogue_teacher_corrects_wrong_steps_without_executing_them(tok):
    env, ep, cfg = CountEnv(), Episode(seed=3), RolloutConfig(max_hints=2)
    pattern = make_pattern("dialogue", teacher=ScriptedTeacher())
    assert isinstance(pattern, Dialogue)
    pattern.begin(env, ep, tok, cfg)
    pattern.respond(env, ep, tok, "answer[4]", cfg)              # a wrong final answer: caught
    assert env.t == 0 and not ep.done
    assert ep.messages[-1] == {"role": "user", "content": "Teacher: not that. Try: think[it is 3]"}
    pattern.respond(env, ep, tok, "think[it is 3]", cfg)         # on the plan: executed, no comment
    assert ep.messages[-1] == {"role": "user", "content": "OK."} and env.t == 1
    pattern.respond(env, ep, tok, "answer[1]", cfg)
    assert ep.messages[-1]["content"] == "Teacher: not that. Try: answer[3]"
    pattern.respond(env, ep, tok, "answer[0]", cfg)              # hints used up: the env answers
    assert ep.done and not ep.success and ep.hints == 2


def test_analogue_shows_a_solved_example_of_another_seed_and_gives_the_reward(tok):
    env, ep, cfg = CountEnv(), Episode(seed=1), RolloutConfig()
    pattern = make_pattern("analogue", example_env=CountEnv())
    assert isinstance(pattern, Analogue)
    pattern.begin(env, ep, tok, cfg)
    other = (Analogue.EXAMPLE_SEED_OFFSET + 1) % 5
    first = ep.messages[0]["content"]
    assert first.startswith(f"Teacher: a solved example. Your task is to: answer {other}.")
    assert f"Solution: think[it is {other}]; answer[{other}]" in first
    assert first.endswith("Your task is to: answer 1.")
    pattern.respond(env, ep, tok, "answer[1]", cfg)
    assert ep.messages[-1]["content"] == "Teacher: correct. Reward +1."


def test_unknown_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="monologue"):
        make_pattern("trialogue")


@pytest.mark.parametrize("name", ["monologue", "dialogue", "analogue"])
def test_episode_masks_mark_exactly_the_sampled_tokens(tok, hydra, name):
    torch.manual_seed(1)
    envs = [CountEnv() for _ in range(3)]
    pattern = make_pattern(name, example_env=CountEnv())
    episodes = run_episodes(hydra, tok, envs, [0, 1, 2], pattern, RolloutConfig(max_reply_tokens=8))
    prefix = [tok.special_id("<|assistant|>")] + tok.encode("\n")
    for ep in episodes:
        assert len(ep.tokens) == len(ep.who) == len(ep.logprobs) == len(ep.values) <= 256
        runs, start = [], None                      # maximal runs of agent tokens
        for i, w in enumerate(ep.who + [0]):
            if w and start is None:
                start = i
            if not w and start is not None:
                runs.append((start, i))
                start = None
        agent_msgs = [m for m in ep.messages if m["role"] == "assistant"]
        assert len(runs) == len(agent_msgs) == ep.turns > 0
        for (a, b), msg in zip(runs, agent_msgs):
            assert ep.tokens[a - 2:a] == prefix                  # generation starts after the tag
            assert tok.decode([t for t in ep.tokens[a:b] if t not in tok.special_tokens.values()]
                              ).strip() == msg["content"]
        assert all(lp == 0.0 for lp, w in zip(ep.logprobs, ep.who) if not w)
        assert all(lp < 0.0 for lp, w in zip(ep.logprobs, ep.who) if w)
        assert ep.reward == (1.0 if ep.success else -1.0)


def test_recomputed_logprobs_of_agent_tokens_match_the_behaviour_logprobs(tok, hydra):
    torch.manual_seed(2)
    episodes = run_episodes(hydra, tok, [CountEnv() for _ in range(4)], [5, 6, 7, 8],
                            make_pattern("dialogue"), RolloutConfig(max_reply_tokens=8))
    from minilm.agents.ltc_data import collate_episodes
    batch = collate_episodes(episodes, tok.eot_id)
    with torch.no_grad():
        recomputed = token_logprobs(hydra, batch["tokens"], batch["attention_mask"])
        head = hydra(batch["tokens"], batch["attention_mask"])[2]["value"].tanh()
    agent = batch["agent_mask"].bool()
    assert agent.sum() > 10
    torch.testing.assert_close(recomputed[agent], batch["old_logprobs"][agent], atol=1e-4, rtol=1e-4)
    # old values are V(state before token t) = tanh(head) at t - 1
    torch.testing.assert_close(head[:, :-1][agent[:, 1:]], batch["old_values"][:, 1:][agent[:, 1:]],
                               atol=1e-5, rtol=1e-5)


def test_a_model_teacher_words_the_correction_but_keeps_the_gold_action(tok, hydra):
    from minilm.agents.patterns import ModelTeacher
    env, ep = CountEnv(), Episode(seed=4)
    env.reset(4)
    teacher = ModelTeacher(hydra.lm, tok, max_new_tokens=6)
    teacher.start(env, ep)
    assert teacher.review(env, ep, "think[it is 4]") is None and ep.plan_pos == 1
    assert teacher.review(env, ep, "answer[9]").endswith("Try: answer[4]")
