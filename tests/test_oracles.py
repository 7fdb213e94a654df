"""General preference oracles for DNO: the verifier's rubric, caching and counting, the reward-model
and judge oracles, and the intransitive (cyclic) oracle (lesson 09)."""

import math

import pytest
import torch
from conftest import tiny_config

from minilm.model import Phi3
from minilm.post.oracles import AnswerOracle, CyclicOracle, JudgeOracle, RewardModelOracle, VerifierOracle

pytestmark = pytest.mark.lesson_09

CONVS = [{"kind": "units_short", "answer": "42", "messages": [{"role": "user", "content": "Q42?"},
                                                         {"role": "assistant", "content": "42"}]},
         {"kind": "man", "answer": "list directory contents",
          "messages": [{"role": "user", "content": "What does `ls` do?"},
                       {"role": "assistant", "content": "list directory contents"}]}]
Q = [{"role": "user", "content": "Q42?"}]


@pytest.mark.parametrize("reply,points", [("42<|end|>", 6), ("43<|end|>", 4), ("99<|end|>", 3),
                                          ("420<|end|>", 2), ("42<|endoftext|>", 5),
                                          ("the answer 42<|end|>", 3)])
def test_verifier_points_follow_the_rubric(reply, points):
    # 42 is correct (6); 43 is near and same digit count (4); 99 same digit count only (3);
    # 420 in form only (2); a correct reply that did not end loses one point (5); a right number
    # outside the bare-integer form is not correct nor in form: ended, ballpark, near (3)
    assert VerifierOracle(CONVS).points(Q, reply) == points


def test_a_wrong_reply_never_reaches_the_positive_threshold():
    oracle = VerifierOracle(CONVS)
    assert max(oracle.points(Q, f"{n}<|end|>") for n in range(0, 1000) if n != 42) == 4
    phrase = [{"role": "user", "content": "What does `ls` do?"}]
    assert oracle.points(phrase, "list directory contents") == 6
    assert oracle.points(phrase, "list directory") <= 4


def test_prefer_is_cached_and_counted():
    oracle = VerifierOracle(CONVS)
    assert oracle.prefer(Q, "42", "43") == 1.0 and oracle.prefer(Q, "43", "42") == 0.0
    assert oracle.prefer(Q, "43", "44") == 0.5           # both near misses: a tie
    calls = oracle.calls
    assert calls == 3                                    # three distinct replies scored, no more
    oracle.prefer_many([(Q, "42", "43"), ("Q42?", "42", "43"), (Q, "43", "44")])
    assert oracle.calls == calls                         # all cached (a string prompt hits too)
    assert oracle.requests > calls


def test_comparison_oracles_count_comparisons_once():
    oracle = CyclicOracle()
    out = oracle.prefer_many([("q", "rock", "paper")] * 5 + [("q", "paper", "rock")])
    assert out == [0.1] * 5 + [0.9] and oracle.calls == 2 and oracle.requests == 6


def test_cyclic_oracle_has_a_cycle_and_checks_its_table():
    o = CyclicOracle()
    assert o.prefer("q", "paper", "rock") > 0.5 and o.prefer("q", "scissors", "paper") > 0.5
    assert o.prefer("q", "rock", "scissors") > 0.5       # intransitive: no ordering exists
    assert o.prefer("q", "I pick Rock!", "banana") == 1.0 and o.prefer("q", "banana", "pear") == 0.5
    with pytest.raises(ValueError, match="must be 1"):
        CyclicOracle(("a", "b"), ((0.5, 0.7), (0.7, 0.5)))


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from minilm.tokenizer import Tokenizer
    return Tokenizer.load(data_dir)


def test_reward_model_oracle_is_sigmoid_of_head_scores(tokenizer):
    from minilm.post.chat import collate, render_chat
    from minilm.post.heads import HydraModel
    torch.manual_seed(0)
    hydra = HydraModel(Phi3(tiny_config()))
    torch.nn.init.normal_(hydra.heads["reward"].weight, std=1.0)    # scores far from 0
    oracle = RewardModelOracle(hydra, tokenizer, temperature=2.0)
    a, b = oracle.score(Q, "42"), oracle.score(Q, "7 apples")
    rows = [render_chat(tokenizer, Q + [{"role": "assistant", "content": r}]) for r in ("42", "7 apples")]
    batch = collate(rows, tokenizer.eot_id, 64)
    with torch.no_grad():
        expected = hydra.score(batch["tokens"], batch["attention_mask"]).tolist()
    assert [a, b] == pytest.approx(expected, abs=1e-5)
    assert oracle.prefer(Q, "42<|end|>", "7 apples") == pytest.approx(1 / (1 + math.exp(-(a - b) / 2)), abs=1e-6)
    assert oracle.calls == 3     # the cache key is the reply string as given: "42<|end|>" is new


def test_judge_oracle_is_order_symmetric_and_cached(tokenizer):
    torch.manual_seed(0)
    judge = JudgeOracle(Phi3(tiny_config(max_seq_len=128)), tokenizer)
    p = judge.prefer(Q, "42", "17")
    q = judge.prefer(Q, "17", "42")
    assert 0.0 <= p <= 1.0 and p + q == pytest.approx(1.0, abs=1e-6)
    assert judge.calls == 2
    judge.prefer(Q, "42", "17")
    assert judge.calls == 2


def test_answer_oracle_still_works():
    oracle = AnswerOracle(CONVS)
    assert oracle.reward(Q, "42<|end|>") == pytest.approx(1.0)
