"""Instruction data and the answer oracle: real answers, computed answers, a disjoint split,
and preference pairs whose chosen reply the oracle judges better."""

import gzip
import importlib
import inspect
import random
import re
from pathlib import Path

import pytest

from data_prep.instructions import (first_sentence, instruction_examples, man_qa, preference_pairs,
                                    split_examples, split_of, stdlib_qa)
from data_prep.synthetic import UNITS, _plural
from minilm.post.oracles import AnswerOracle, normalise, split_reply, token_f1

pytestmark = pytest.mark.lesson_06

PAGE = r""".TH FROB 1
.SH NAME
frob \- frobnicate the widgets quickly
.SH SYNOPSIS
.B frob
[options]
"""


def _write_page(directory: Path, name: str, roff: str) -> None:
    with gzip.open(directory / f"{name}.gz", "wt") as f:
        f.write(roff)


def test_man_answers_are_the_name_lines(tmp_path):
    _write_page(tmp_path, "frob.1", PAGE)
    _write_page(tmp_path, "gcloud_frob_list.1", PAGE.replace("frob ", "gcloud frob list "))
    _write_page(tmp_path, "long.1", PAGE.replace("frob \\-", "long \\-").replace(
        "frobnicate the widgets quickly", "a description far too long for a tiny model to say back"))
    assert man_qa((str(tmp_path),)) == (("frob", "frobnicate the widgets quickly"),)


@pytest.mark.skipif(not Path("/usr/share/man/man1/ls.1.gz").exists(), reason="no ls man page here")
def test_real_man_page_of_ls():
    assert ("ls", "list directory contents") in man_qa()


def test_stdlib_answers_are_first_docstring_sentences():
    qa = stdlib_qa()
    assert len(qa) > 100
    checked = 0
    for name, sentence in random.Random(0).sample(qa, 25):
        module, func = name.rsplit(".", 1)
        try:
            obj = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            continue  # platform-specific modules
        doc = inspect.getdoc(obj)
        if doc is None or obj.__module__.split(".")[0] != module.split(".")[0]:
            continue  # re-exported from a C accelerator with another docstring
        assert first_sentence(doc) == sentence, name
        checked += 1
    assert checked >= 10
    assert first_sentence("Return a value, e.g. 3.") is None
    assert first_sentence("Split a path.  More text.") == "Split a path"


def test_synthetic_answers_are_computed():
    exs = instruction_examples(300, seed=3, sources=("arithmetic", "units_short"))
    factors = {(big, small): f for big, small, f in UNITS}
    unit = {_plural(u, 2): u for big, small, _ in UNITS for u in (big, small)}
    for ex in exs:
        q, a = ex["messages"][0]["content"], ex["answer"]
        assert ex["messages"][1]["content"] == a
        if ex["kind"] == "arithmetic":
            x, op, y = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q).groups()
            assert int(a) == eval(f"{x}{op}{y}")
        else:
            if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", q):   # big -> small
                assert int(a) == int(m[2]) * factors[(unit[m[3]], unit[m[1]])]
            else:
                m = re.fullmatch(r"How many (\w+) are (\d+) (\w+)\?", q)      # small -> big
                assert int(a) * factors[(unit[m[1]], unit[m[3]])] == int(m[2])
    assert {e["kind"] for e in exs} == {"arithmetic", "units_short"}


def test_split_is_disjoint_stable_and_about_ten_percent():
    train = instruction_examples(600, seed=0, split="train")
    held = instruction_examples(600, seed=5, split="heldout")
    assert train and held
    assert not {e["id"] for e in train} & {e["id"] for e in held}
    assert all(split_of(e["id"]) == "train" for e in train)
    everything = instruction_examples(2000, seed=1)
    t, h = split_examples(everything)
    assert len(t) + len(h) == len(everything) and 0.05 < len(h) / len(everything) < 0.15
    assert [e["id"] for e in instruction_examples(50, seed=2)] == \
           [e["id"] for e in instruction_examples(50, seed=2)]


def test_oracle_rules_by_hand():
    convs = [{"prompt": [{"role": "user", "content": "ls?"}], "answer": "list directory contents",
              "kind": "man"},
             {"prompt": "m?", "answer": "7000", "kind": "units_short"},
             {"prompt": "w?", "answer": "12", "kind": "word_problem"}]
    o = AnswerOracle(convs)
    assert o.reward("ls?", "List directory contents.<|end|>") == pytest.approx(1.0)
    assert o.reward("ls?", "list directory contents", ended=False) == pytest.approx(0.8)
    assert o.reward("ls?", "list directory contents<|user|>more") == pytest.approx(0.8)
    f1 = token_f1("list the directory", "list directory contents")
    assert f1 == pytest.approx(2 / 3)
    assert o.reward("ls?", "list the directory<|end|>") == pytest.approx(0.6 * 0.5 * f1 + 0.4)
    assert o.reward("m?", "7000<|end|>") == pytest.approx(1.0)
    assert o.reward("m?", "7001<|end|>") == pytest.approx(0.4)
    assert o.reward("m?", "It is 7000 metres<|end|>") == pytest.approx(0.2)
    assert o.judge("w?", "3 times 4 is 12.\nThe answer is 12.")["correct"]
    assert o.reward("w?", "3 times 4 is 12.\nThe answer is 13.") == pytest.approx(0.4)
    assert o.prefer("m?", "7000", "7001") > 0.9 and o.prefer("m?", "7000", "7000") == 0.5
    assert normalise("  `List`  Directory, contents. ") == "list directory contents"
    assert split_reply("abc<|end|>def") == ("abc", True)
    with pytest.raises(KeyError, match="no reference"):
        o.reward("unknown?", "x")


def test_preference_pairs_chosen_beats_rejected():
    pairs = preference_pairs(400, seed=0, sources=("dictionary", "arithmetic", "ops2", "word"))
    reasons = {p["reason"].split(":")[0] for p in pairs}
    assert {"wrong number", "truncated answer", "another entry's answer (a near miss)",
            "keeps going after the answer", "wrong worked answer"} <= reasons
    oracle = AnswerOracle(pairs)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        assert oracle.prefer(p["prompt"], p["chosen"], p["rejected"]) > 0.5, p
        assert oracle.judge(p["prompt"], p["chosen"])["correct"], p
    assert len({p["id"] for p in pairs}) == len(pairs)
