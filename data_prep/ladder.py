"""The skill ladder: graded problems with computed, worked answers, from one sum to word problems.

    from data_prep.ladder import LADDER, ladder_problem, ladder_conversations, ladder_documents
    p = ladder_problem("ops3", random.Random(0))   # {"id", "rung", "question", "worked", "answer"}
    train = ladder_conversations(4000, seed=0, split="train")   # chat examples, rungs in equal shares
    test = ladder_conversations(600, seed=1, split="heldout")   # what the evaluation asks
    docs = list(ladder_documents(2000, seed=0))                 # pretraining worksheets, train split only

Phi-3's thesis (arXiv 2404.14219, after phi-1, arXiv 2306.11644) is that heavily filtered real text
plus synthetic "textbook" data let a small model reason beyond its size. The ladder is our synthetic
half, graded from easy to hard so that every method has rungs it can still climb:

    ops1  "What is 23 + 8?"             one step           ops3  three steps, left to right
    ops2  "What is 23 + 8 - 5?"         two steps          ops4  four steps
    units "How many inches are in 7 feet?"   one step with a factor the model must know
    word  a GSM8K-shaped story of 2-4 steps with * and / (data_prep.synthetic.word_problem_steps)

Every reply is WORKED: one line per step, then "The answer is N." A small model cannot add three
numbers in its head, but it can copy two numbers and add them, one line at a time; the written
steps turn one hard prediction into several easy ones (chain of thought, arXiv 2201.11903).

Held out by construction: a problem's id is its question, and `split_of(id)` (a hash) sends ~10% of
all possible questions to "heldout". Documents and training conversations are drawn from "train"
only, so no evaluation question is ever trained on, whatever the seeds and sizes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from data_prep.document import Document
from data_prep.synthetic import split_of, unit_conversion_steps, word_problem_steps

LADDER = ("ops1", "ops2", "ops3", "ops4", "units", "word")   # easy -> hard
MIDDLE = ("ops2", "ops3", "units")                           # the rungs SFT should half-solve


def _chain(rng: random.Random, n_ops: int) -> tuple[str, list[str], int]:
    """A two-digit start, then n_ops additions/subtractions of 1..9, left to right, never below 0.
    One-digit steps keep the skill to the carry: a step changes the tens digit by at most one."""
    value = rng.randint(10, 99)
    question, lines = str(value), []
    for _ in range(n_ops):
        b = rng.randint(1, 9)
        op = rng.choice("+-") if b <= value else "+"    # a negative running total is a different skill
        new = value + b if op == "+" else value - b
        question += f" {op} {b}"
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    return f"What is {question}?", lines, value


def ladder_problem(rung: str, rng: random.Random) -> dict:
    """One problem of a rung: {"id", "rung", "question", "worked", "answer"} with a computed answer."""
    if rung.startswith("ops") and rung in LADDER:
        question, lines, answer = _chain(rng, int(rung[3:]))
        worked = "\n".join(lines)
    elif rung == "units":
        question, _, worked, answer = unit_conversion_steps(rng)
    elif rung == "word":
        question, _, worked, answer = word_problem_steps(rng)
    else:
        raise ValueError(f"unknown ladder rung {rung!r}; the rungs are {', '.join(LADDER)}")
    return {"id": f"{rung}/{question}", "rung": rung, "question": question,
            "worked": f"{worked}\nThe answer is {answer}.", "answer": answer}


def ladder_problems(n: int, seed: int = 0, split: str = "train", rungs=LADDER) -> list[dict]:
    """`n` distinct problems of `split` ("train", "heldout", "all"), an equal share per rung, in rung order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    rng, out = random.Random(seed), []
    for i, rung in enumerate(rungs):
        share, seen = (n - len(out)) // (len(rungs) - i), set()
        for _ in range(share * 100):   # bounded: a rung with few distinct questions stops early
            if len(seen) == share:
                break
            p = ladder_problem(rung, rng)
            if p["id"] not in seen and (split == "all" or split_of(p["id"]) == split):
                seen.add(p["id"])
                out.append(p)
    return out


def ladder_conversations(n: int, seed: int = 0, split: str = "train", rungs=LADDER) -> list[dict]:
    """Problems as chat examples {"id", "kind" (the rung), "messages", "answer"}, shuffled."""
    out = [{"id": p["id"], "kind": p["rung"], "answer": str(p["answer"]),
            "messages": [{"role": "user", "content": p["question"]},
                         {"role": "assistant", "content": p["worked"]}]}
           for p in ladder_problems(n, seed, split, rungs)]
    random.Random(seed).shuffle(out)
    return out


def ladder_documents(n_documents: int, seed: int = 0, per_document: int = 12) -> Iterator[Document]:
    """Worksheets of `per_document` train-split problems of mixed rungs: pretraining text in the reply's
    own shape (question, worked lines, "The answer is N."), so SFT only has to teach the chat turns."""
    problems = ladder_problems(n_documents * per_document, seed, split="train")
    random.Random(seed).shuffle(problems)
    for i in range(n_documents):
        sheet = problems[i * per_document:(i + 1) * per_document]
        text = "\n\n".join(f"Question: {p['question']}\n{p['worked']}" for p in sheet)
        yield Document(id=f"synthetic/ladder/{i}", source="synthetic", text=text,
                       meta={"kind": "ladder", "ids": [p["id"] for p in sheet]})
