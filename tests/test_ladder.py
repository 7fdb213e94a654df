"""The skill ladder (lesson 05) and its place in the evaluation (lesson 12): every answer re-derived
here, the held-out split never reaches training text, and gains over SFT carry honest intervals."""

import random
import re

import pytest

from data_prep.ladder import LADDER, MIDDLE, ladder_conversations, ladder_documents, ladder_problem, ladder_problems
from data_prep.synthetic import SyntheticConfig, split_of, synthetic_documents
from minilm.eval.ladder import ladder_gains, ladder_items, ladder_metrics
from minilm.post.oracles import AnswerOracle
from minilm.post.winrate import paired_gain
from test_reward import base_checkpoint  # noqa: F401

pytestmark = pytest.mark.lesson_05


def _chain_value(question: str) -> int:
    """The answer of "What is a + b - c?", computed here left to right without the library."""
    tokens = re.fullmatch(r"What is (.+)\?", question)[1].split()
    value = int(tokens[0])
    for op, b in zip(tokens[1::2], tokens[2::2]):
        value = value + int(b) if op == "+" else value - int(b)
    return value


@pytest.mark.parametrize("rung", [r for r in LADDER if r.startswith("ops")])
def test_arithmetic_rungs_have_their_step_count_and_correct_worked_lines(rung):
    rng = random.Random(0)
    for _ in range(200):
        p = ladder_problem(rung, rng)
        lines = p["worked"].split("\n")
        assert len(lines) == int(rung[3:]) + 1 and lines[-1] == f"The answer is {p['answer']}."
        assert p["answer"] == _chain_value(p["question"]) >= 0
        for line in lines[:-1]:   # every written step is itself true
            a, op, b, _, r = line.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(r) >= 0


def test_units_and_word_rungs_end_with_their_computed_answer():
    rng = random.Random(1)
    for rung in ("units", "word"):
        for _ in range(50):
            p = ladder_problem(rung, rng)
            assert p["worked"].endswith(f"\nThe answer is {p['answer']}.")
            assert int(re.findall(r"-?\d+", p["worked"].split("\n")[-2])[-1]) == p["answer"]


def test_an_unknown_rung_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown ladder rung 'ops9'"):
        ladder_problem("ops9", random.Random(0))


def test_splits_are_disjoint_equal_per_rung_and_deterministic():
    train = ladder_problems(600, seed=0, split="train")
    held = ladder_problems(300, seed=1, split="heldout")   # the laptop suite's 50 per rung
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    assert all(split_of(p["id"]) == "heldout" for p in held)
    for rung in LADDER:
        assert sum(p["rung"] == rung for p in held) == 50
    assert ladder_problems(60, seed=3, split="heldout") == ladder_problems(60, seed=3, split="heldout")


def test_no_pretraining_document_holds_a_heldout_question():
    held = {p["question"] for p in ladder_problems(1200, seed=0, split="heldout")}
    texts = [d.text for d in ladder_documents(300, seed=0)]
    texts += [d.text for d in synthetic_documents(SyntheticConfig(n_documents=600, seed=0,
                                                                  mix={"word_problem": 0.5, "conversion": 0.5}))]
    asked = {q for t in texts for q in re.findall(r"(?:Question|Exercise): (.+?\?)", t)}
    assert len(asked) > 2000 and not asked & held


def test_conversations_are_judged_correct_by_the_oracle_and_a_wrong_last_number_is_not():
    convs = ladder_conversations(70, seed=2, split="train")
    oracle = AnswerOracle(convs)
    for c in convs:
        if c["kind"] == "dictionary":
            continue
        prompt, reply = c["messages"][:1], c["messages"][1]["content"]
        assert oracle.judge(prompt, reply, ended=True)["correct"]
        wrong = reply.replace(f"The answer is {c['answer']}.", f"The answer is {int(c['answer']) + 1}.")
        assert not oracle.judge(prompt, wrong, ended=True)["correct"]


def test_items_come_rung_by_rung_and_metrics_average_them():
    items = ladder_items(3, seed=0)
    assert [i["kind"] for i in items] == [r for r in LADDER for _ in range(3)]
    correct = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]   # ops1 3/3, ops2 1/3, ..., word 0/3
    m = ladder_metrics(correct, items)
    assert m["ladder_ops1"] == 1.0 and m["ladder_ops2"] == pytest.approx(1 / 3) and m["ladder_word"] == 0.0
    assert m["ladder_acc"] == pytest.approx(7 / 18)
    mid = [c for c, i in zip(correct, items) if i["kind"] in MIDDLE]
    assert m["ladder_acc_mid"] == pytest.approx(sum(mid) / len(mid))


def test_paired_gain_interval_excludes_zero_only_when_the_items_support_it():
    base = [0] * 100 + [1] * 100
    better = [1] * 30 + [0] * 70 + [1] * 100      # 30 items fixed, none broken
    g, lo, hi = paired_gain(better, base)
    assert g == pytest.approx(0.15) and 0 < lo < g < hi
    noisy = [1, 0] * 50 + [0, 1] * 50             # as many items broken as fixed
    g, lo, hi = paired_gain(noisy, [0, 1] * 100)
    assert g == 0 and lo < 0 < hi
    with pytest.raises(ValueError, match="equal"):
        paired_gain([1, 0], [1])


def test_gains_are_added_after_sft_only():
    rows = {"pretrain": {"ladder_correct": [0, 0, 0, 0]}, "sft": {"ladder_correct": [0, 1, 0, 1]},
            "dpo": {"ladder_correct": [1, 1, 1, 1]}, "ltc": {"ladder_correct": None}}
    out = ladder_gains(rows)
    assert out["pretrain"]["ladder_gain"] is None and out["sft"]["ladder_gain"] is None
    assert out["dpo"]["ladder_gain"] == 0.5 and out["dpo"]["ladder_gain_lo"] <= 0.5 <= out["dpo"]["ladder_gain_hi"]
    assert out["ltc"]["ladder_gain"] is None and list(out) == list(rows)


def test_ladder_gain_benchmark_gives_a_model_against_itself_a_zero_gain(base_checkpoint, capsys):  # noqa: F811
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ladder_gain.py"
    spec = importlib.util.spec_from_file_location("ladder_gain", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main([str(base_checkpoint), str(base_checkpoint), "--per-rung", "2", "--max-new-tokens", "8"])
    assert "gain" not in rows[0] and (rows[1]["gain"], rows[1]["gain_lo"], rows[1]["gain_hi"]) == (0, 0, 0)
    assert rows[0]["ladder_acc"] == rows[1]["ladder_acc"] and set(rows[0]) >= {f"ladder_{r}" for r in LADDER}
    table = capsys.readouterr().out
    assert table.startswith("| checkpoint | ladder_acc | mid |") and "+0.000 [+0.000, +0.000]" in table
