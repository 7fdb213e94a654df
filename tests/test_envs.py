"""The three LTC environments: experts solve every sampled task, bad actions are answered, splits
are disjoint, HotpotQA scoring matches hand-computed values, episodes fit the tiny model."""

import itertools
import random
import statistics

import pytest

from minilm import MinilmError
from minilm.agents.envs import ENVS, make_env
from minilm.agents.envs.base import SPLIT_OFFSET, world_seed
from minilm.agents.envs.qa import exact_match, f1_score, normalize_answer

pytestmark = pytest.mark.lesson_10

N_SEEDS = 200
MAX_EPISODE_CHARS = 700   # task + observations + actions of a whole expert episode (interfaces note)
MAX_EXPERT_STEPS = 8
MIN_FIT_FRACTION = 0.9    # expert episodes (in tokens, chat template included) within the tiny context


def play(env, seed, actions=None):
    """Reset, play `actions` (default: the expert's); return (text, last info, steps, done)."""
    text = env.reset(seed)
    actions = env.expert_actions() if actions is None else actions
    info, done = {}, False
    for a in actions:
        obs, reward, done, info = env.step(a)
        assert reward == (1.0 if info["success"] else 0.0)
        text += f"\n{a}\n{obs}"
        if done:
            break
    return text, info, len(actions), done


@pytest.mark.parametrize("name", sorted(ENVS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_solves_every_task_and_fits(name, split):
    env, sizes = make_env(name, split), []
    for seed in range(N_SEEDS):
        text, info, steps, done = play(env, seed)
        assert done and info["success"] and info["score"] == 1.0, (name, seed, text)
        assert steps <= MAX_EXPERT_STEPS <= env.max_steps + MAX_EXPERT_STEPS
        assert "Your task is to:" in text
        sizes.append(len(text))
    assert max(sizes) <= MAX_EPISODE_CHARS, (name, max(sizes))
    print(f"{name}/{split}: episode chars max {max(sizes)} mean {statistics.mean(sizes):.0f}")


@pytest.fixture(scope="module")
def bpe_2048(tmp_path_factory):
    """A 2048-token BPE trained on stdlib docstrings, like the tiny model's (runs/data's pipeline
    tokenizer gives the same lengths within a few tokens; the 320-token test BPE would not)."""
    from data_prep.stdlib_docs import stdlib_documents
    from minilm.tokenizer import Tokenizer
    docs = [text for _, text in itertools.islice(stdlib_documents(), 300)]
    return Tokenizer.train(iter(docs), 2048, progress=False)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_expert_episodes_fit_the_tiny_context_in_tokens(bpe_2048, name):
    """The expert's episode as LTC renders it (one chat: the observation as the user, each action
    as the assistant, expert_demos() filters on exactly this) must fit the tiny preset's context
    for the large majority of tasks; the ones that do not are dropped from the SFT data and fail
    during exploration for lack of room."""
    from minilm.agents.ltc_data import expert_messages
    from minilm.agents.patterns import Episode, RolloutConfig, _agent_turn, make_pattern
    from minilm.config import get_preset
    from minilm.post.chat import render_chat
    limit, tok = get_preset("tiny").max_seq_len, bpe_2048
    prefix, end = [tok.special_id("<|assistant|>")] + tok.encode("\n"), tok.special_id("<|end|>")
    for seed in range(5):       # render_chat of the expert's chat == the tokens run_episodes builds
        env, ep, pattern, rcfg = make_env(name), Episode(seed=seed), make_pattern("monologue"), RolloutConfig()
        pattern.begin(env, ep, tok, rcfg)
        for action in env.expert_actions():
            ep.add(prefix, 0)
            reply = tok.encode(action) + [end]
            pattern.respond(env, ep, tok, _agent_turn(tok, ep, reply, [-1.0] * len(reply)), rcfg)
        assert ep.success and ep.tokens == render_chat(tok, expert_messages(env, seed)[0])[0]
    for split in ("train", "test"):
        env = make_env(name, split)
        lengths = [len(render_chat(tok, expert_messages(env, seed)[0])[0]) for seed in range(N_SEEDS)]
        fit = sum(n <= limit for n in lengths) / len(lengths)
        print(f"{name}/{split}: tokens mean {statistics.mean(lengths):.0f} max {max(lengths)}, "
              f"{fit:.0%} fit {limit}")
        assert fit >= MIN_FIT_FRACTION, (name, split, fit, statistics.mean(lengths))


@pytest.mark.parametrize("name", sorted(ENVS))
def test_same_seed_same_task_other_seed_other_task(name):
    a, b = make_env(name), make_env(name)
    for seed in range(20):
        assert a.reset(seed) == b.reset(seed)
        assert a.expert_actions() == b.expert_actions() and a.task == b.task
    assert len({a.reset(s) for s in range(20)}) >= 15


@pytest.mark.parametrize("name", sorted(ENVS))
def test_bad_actions_are_answered_never_raised(name):
    env, rng = make_env(name), random.Random(0)
    junk = ["", "dance", "go to moon 7", "take nothing from nowhere", "put x in y", "open sofa 1",
            "search[]", "lookup[zzz]", "finish", "answer[abc]", "think[", "use lamp", "??" * 50]
    for seed in range(30):
        env.reset(seed)
        for a in rng.sample(junk, 5):
            obs, reward, done, info = env.step(a)
            assert isinstance(obs, str) and obs and reward == 0.0 and not info["success"]
            if obs.startswith("Nothing happens"):
                assert "Valid" in obs or "Actions:" in obs or "valid" in obs, obs
            if done:
                break


def test_unknown_action_lists_the_valid_ones():
    for name, words in [("household", "go to X"), ("qa", "search[entity]"), ("math", "answer[N]")]:
        env = make_env(name)
        env.reset(0)
        obs, _, done, _ = env.step("fly away")
        assert words in obs and not done


@pytest.mark.parametrize("name", sorted(ENVS))
def test_episode_ends_after_max_steps_as_failure(name):
    env = make_env(name, max_steps=3)
    env.reset(1)
    results = [env.step("wait") for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True]
    assert not results[-1][3]["success"] and "Out of steps" in results[-1][0]
    obs, reward, done, _ = env.step("wait")          # after the end: answered, not raised
    assert done and reward == 0.0 and "over" in obs


def test_household_admissible_actions_are_accepted_and_random_walks_never_raise():
    env, rng = make_env("household"), random.Random(1)
    for seed in range(40):
        env.reset(seed)
        for _ in range(env.max_steps):
            acts = env.admissible_actions()
            obs, _, done, _ = env.step(rng.choice(acts))
            assert not obs.startswith("Nothing happens"), obs
            if done:
                break


def test_household_needs_the_appliance_step():
    env = make_env("household")
    for seed in range(200):
        env.reset(seed)
        if env.task["type"] in ("clean", "heat", "cool"):
            skipped = [a for a in env.expert_actions() if not a.startswith(env.task["type"])]
            _, info, _, _ = play(env, seed, skipped)
            assert not info["success"], env.task
            return
    pytest.fail("no clean/heat/cool task in 200 seeds")


def test_household_has_all_six_task_types():
    env = make_env("household")
    kinds = set()
    for s in range(100):
        env.reset(s)
        kinds.add(env.task["type"])
    assert kinds == {"pick", "look", "clean", "heat", "cool", "two"}


def test_splits_never_share_a_world_seed_or_a_question():
    assert world_seed("train", SPLIT_OFFSET - 1) < world_seed("test", 0)
    with pytest.raises(MinilmError):
        world_seed("train", SPLIT_OFFSET)
    for name in ("qa", "math"):
        train, test = make_env(name, "train"), make_env(name, "test")
        qs = [{(e.reset(s), e.task["question"])[1] for s in range(N_SEEDS)} for e in (train, test)]
        assert not qs[0] & qs[1], name
    train, test = make_env("qa", "train"), make_env("qa", "test")
    funcs = [set() for _ in range(2)]
    for s in range(N_SEEDS):
        for e, fs in zip((train, test), funcs):
            e.reset(s)
            fs.add(e.task["gold_titles"][0])
    assert not funcs[0] & funcs[1]


def test_hotpotqa_normalisation_em_and_f1_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Text wrapping and filling.", "Text wrapping and filling") == 1.0
    assert exact_match("text wrapping", "Text wrapping and filling") == 0.0
    # prediction "a cat sat" -> [cat, sat]; gold "the cat sat down" -> [cat, sat, down]
    # precision 2/2, recall 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert f1_score("a cat sat", "the cat sat down") == pytest.approx(0.8)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("yes", "no") == 0.0 and f1_score("no", "No.") == 1.0
    assert f1_score("yes it is", "yes") == 0.0      # yes/no must match exactly


def test_qa_tools_search_lookup_and_partial_credit():
    env = make_env("qa")
    seed = next(s for s in range(100) if (env.reset(s), env.task["type"])[1] == "bridge")
    env.reset(seed)
    func, module = env.task["gold_titles"]
    obs, *_ = env.step(f"search[{func}]")
    assert obs.startswith(f"{func}:") and f"Module: {module}." in obs
    obs, *_ = env.step("lookup[module]")
    assert obs == f"(Result 1 / 1) Module: {module}."
    obs, *_ = env.step("search[no such entity]")
    assert obs.startswith("Could not find [no such entity]. Similar:")
    words = env.task["answer"].split()
    obs, reward, done, info = env.step(f"finish[{words[0]} {words[-1]} extra]")
    assert done and reward == 0.0 and not info["success"] and 0.0 < info["score"] < 1.0


def test_math_think_is_recorded_and_answer_is_checked():
    env = make_env("math")
    env.reset(3)
    assert env.step("think[let me see]")[0] == "OK." and env.thoughts == ["let me see"]
    steps = env.task["steps"]   # the ladder's worked lines: the last one computes the answer
    assert steps[-1].rstrip(".").endswith(str(env.task["answer"]))
    obs, reward, done, info = env.step(f"answer[{env.task['answer'] + 1}]")
    assert done and reward == 0.0 and obs == "Incorrect."
    assert make_env("math").admissible_actions() == []


def test_make_env_and_misuse_raise_clear_errors():
    with pytest.raises(MinilmError, match="household"):
        make_env("alfworld")
    with pytest.raises(MinilmError, match="split"):
        make_env("qa", split="dev")
    with pytest.raises(MinilmError, match="reset"):
        make_env("math").step("answer[1]")
    with pytest.raises(MinilmError, match="seed"):
        make_env("math").reset(-1)


def test_math_env_serves_the_ladder_and_its_test_split_is_the_ladders_held_out_split():
    from data_prep.synthetic import split_of
    from minilm.agents.envs.math_env import RUNGS
    for split, wanted in (("train", "train"), ("test", "heldout")):
        env, rungs = make_env("math", split=split), set()
        for seed in range(40):
            obs = env.reset(seed)
            assert split_of(env.task["id"]) == wanted and obs.endswith(env.task["question"])
            rungs.add(env.task["rung"])
            assert env.expert_actions()[-1] == f"answer[{env.task['answer']}]"
        assert rungs == set(RUNGS)
