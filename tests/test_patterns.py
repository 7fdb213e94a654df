"""LTC's communication patterns and episodes (minilm/agents/patterns.py, lessons/10_ltc.md).

A tiny fake environment following the Env protocol of minilm/agents/envs/base.py stands in for the
real ones, so these tests pin down the patterns whatever the environments do.
"""

import pytest
import torch
from conftest import tiny_config

from minilm.agents.patterns import (AGENT, SAMPLED, SYSTEM, TEACHER, VETOED, Analogue, Dialogue, Episode, Monologue,
                                    RolloutConfig, ScriptedTeacher, make_pattern, run_episodes)
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
    # the hints are teacher text (imitated through the policy loss), their chat tags system text
    hint = tok.encode("Teacher: not that. Try: answer[3]")
    at = next(i for i in range(len(ep.tokens)) if ep.tokens[i:i + len(hint)] == hint)
    assert ep.who[at:at + len(hint)] == [TEACHER] * len(hint) and ep.who[at - 1] == SYSTEM


def test_a_vetoed_reply_is_marked_vetoed_and_an_accepted_one_stays_the_agents(tok):
    env, ep, cfg = CountEnv(), Episode(seed=3), RolloutConfig()
    pattern = make_pattern("dialogue")
    pattern.begin(env, ep, tok, cfg)
    from minilm.agents.patterns import _agent_turn
    replies = {}
    for text in ("think[it is 3]", "answer[1]", "answer[3]"):      # accepted, vetoed, accepted
        ep.add([tok.special_id("<|assistant|>")] + tok.encode("\n"), SYSTEM)
        start, reply = len(ep.tokens), tok.encode(text) + [tok.special_id("<|end|>")]
        pattern.respond(env, ep, tok, _agent_turn(tok, ep, reply, [-1.0] * len(reply)), cfg)
        replies[text] = ep.who[start:start + len(reply)]
    assert set(replies["answer[1]"]) == {VETOED} and ep.hints == 1
    assert set(replies["think[it is 3]"]) == set(replies["answer[3]"]) == {AGENT} and ep.success
    # the terminal reward's place: the last executed reply's <|end|>, before the closing newline
    assert ep.last_agent_index() == len(ep.tokens) - 1 - len(tok.encode("\n"))


def test_analogue_shows_a_solved_example_of_another_seed_and_gives_the_reward(tok):
    env, ep, cfg = CountEnv(), Episode(seed=1), RolloutConfig()
    pattern = make_pattern("analogue", example_env=CountEnv())
    assert isinstance(pattern, Analogue)
    pattern.begin(env, ep, tok, cfg)
    other = (Analogue.EXAMPLE_SEED_OFFSET + 1) % 5
    first = ep.messages[0]["content"]
    assert first.startswith(f"Teacher: a solved example. Your task is to: answer {other}.")
    assert first.endswith(f"Solution: think[it is {other}]; answer[{other}]")
    assert roles(ep)[1] == ("user", "Your task is to: answer 1.")    # the task: its own message
    # the example is teacher text, the task environment text
    assert ep.who.count(TEACHER) == len(tok.encode(first)) and ep.who.count(SYSTEM) == len(ep.who) - ep.who.count(TEACHER)
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
        runs, start = [], None                      # maximal runs of sampled tokens
        for i, w in enumerate(ep.who + [SYSTEM]):
            if w in SAMPLED and start is None:
                start = i
            if w not in SAMPLED and start is not None:
                runs.append((start, i))
                start = None
        agent_msgs = [m for m in ep.messages if m["role"] == "assistant"]
        assert len(runs) == len(agent_msgs) == ep.turns > 0
        for (a, b), msg in zip(runs, agent_msgs):
            assert ep.tokens[a - 2:a] == prefix                  # generation starts after the tag
            assert tok.decode([t for t in ep.tokens[a:b] if t not in tok.special_tokens.values()]
                              ).strip() == msg["content"]
        assert all(lp == 0.0 for lp, w in zip(ep.logprobs, ep.who) if w not in SAMPLED)
        assert all(lp < 0.0 for lp, w in zip(ep.logprobs, ep.who) if w in SAMPLED)
        teacher_said = sum(len(tok.encode(m["content"])) for m in ep.messages if m["content"].startswith("Teacher:"))
        assert ep.who.count(TEACHER) == (0 if name == "monologue" else teacher_said)
        assert ep.who.count(VETOED) == 0 or name == "dialogue"
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


TEACHER_SAYS = "Read the task again."


@pytest.fixture(scope="module")
def taught_teacher(tok):
    """A tiny chat model trained (60 Adam steps, ~2 s) to answer every correction request with
    TEACHER_SAYS: a teacher whose words we know, so the test can find them in the episodes. The
    requests quote random token strings, like the random student's actions."""
    import random

    from minilm.agents.patterns import ModelTeacher
    from minilm.model import Phi3
    from minilm.post.chat import render_chat
    torch.manual_seed(0)
    model, rng = Phi3(tiny_config(max_seq_len=256)), random.Random(0)
    plain = sorted(set(range(tok.n_vocab)) - set(tok.special_tokens.values()))
    requests = [(tok.decode(rng.choices(plain, k=rng.randint(1, 8))).strip(),
                 f"answer[{i % 5}]" if i % 2 else f"think[it is {i % 5}]") for i in range(16)]
    rows = [render_chat(tok, ModelTeacher.request(a, g) + [{"role": "assistant", "content": TEACHER_SAYS}])
            for a, g in requests]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [tok.eot_id] * (width - len(ids)) for ids, _ in rows])
    learn = torch.tensor([mask + [0] * (width - len(mask)) for _, mask in rows]).bool()[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(ids[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits[learn], ids[:, 1:][learn])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def test_a_model_teacher_speaks_in_the_episode_as_non_agent_tokens(tok, hydra, taught_teacher):
    """Dialogue with a ModelTeacher: each correction is the teacher MODEL's reply plus the gold
    action, as a user message: TEACHER content (imitated, never sampled) between SYSTEM chat tags."""
    from minilm.agents.patterns import ModelTeacher
    torch.manual_seed(5)
    teacher = ModelTeacher(taught_teacher, tok)
    episodes = run_episodes(hydra, tok, [CountEnv() for _ in range(3)], [0, 1, 2],
                            make_pattern("dialogue", teacher=teacher), RolloutConfig(max_reply_tokens=8, max_hints=2))
    newline, user, end = tok.encode("\n"), tok.special_id("<|user|>"), tok.special_id("<|end|>")
    for ep in episodes:
        said = [m["content"] for m in ep.messages if m["content"].startswith("Teacher:")]
        # the random student never hits the plan, so both hints name its first step
        assert said == [f"Teacher: {TEACHER_SAYS} Try: think[it is {ep.seed % 5}]"] * 2
        span = [user] + newline + tok.encode(said[0]) + [end] + newline
        starts = [i for i in range(len(ep.tokens)) if ep.tokens[i:i + len(span)] == span]
        assert len(starts) == 2 and ep.hints == 2
        roles_of_span = [SYSTEM] * 2 + [TEACHER] * (len(span) - 4) + [SYSTEM] * 2      # <|user|> \n ... <|end|> \n
        assert all(ep.who[i:i + len(span)] == roles_of_span and not any(ep.logprobs[i:i + len(span)]) for i in starts)
    # the plan still advances on a right action, and an empty reply falls back to the scripted words
    env, ep = CountEnv(), Episode(seed=4)
    env.reset(4)
    teacher.start(env, ep)
    assert teacher.review(env, ep, "think[it is 4]") is None and ep.plan_pos == 1
    mute = ModelTeacher(taught_teacher, tok, max_new_tokens=1)        # one token: "R", not empty
    assert mute.review(env, ep, "answer[9]").endswith("Try: answer[4]")


def test_a_bad_teacher_checkpoint_is_a_clear_error(tok, tmp_path):
    from minilm import MinilmError
    from minilm.agents.patterns import ModelTeacher
    from minilm.checkpoint import save_checkpoint
    from minilm.model import Phi3
    from minilm.stages.ltc import ltc_config, run_ltc
    with pytest.raises(MinilmError, match="cannot load the teacher checkpoint .*nowhere"):
        ModelTeacher.from_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "no-tok", Phi3(tiny_config(max_seq_len=256)))           # weights only
    with pytest.raises(MinilmError, match="no chat tokenizer"):
        ModelTeacher.from_checkpoint(tmp_path / "no-tok")
    save_checkpoint(tmp_path / "ok", Phi3(tiny_config(max_seq_len=256)), tok)
    teacher = ModelTeacher.from_checkpoint(tmp_path / "ok")
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    # run_ltc checks --teacher before any training, and refuses one that would go unused
    with pytest.raises(MinilmError, match="teacher"):
        run_ltc(ltc_config(teacher=str(tmp_path / "nowhere"), pattern="dialogue", init=str(tmp_path / "ok"),
                           out_dir=str(tmp_path / "run"), device="cpu"))
    with pytest.raises(MinilmError, match="monologue has no teacher"):
        run_ltc(ltc_config(teacher=str(tmp_path / "ok"), pattern="monologue", out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
