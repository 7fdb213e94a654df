"""Instruction (SFT) conversations and offline preference pairs with checkable answers (lesson 06).

    from data_prep.instructions import instruction_examples, preference_pairs
    train = instruction_examples(4000, seed=0, split="train")
    held = instruction_examples(300, seed=1, split="heldout")
    pairs = preference_pairs(1000, seed=0, split="train")

No instruction-tuning set ships offline, but real text yields question-answer pairs whose answers
PEOPLE wrote, and the skill ladder (data_prep/ladder.py) yields problems whose answers are computed:

    dictionary   "What is an omen, in The Devil's Dictionary?" -> "A sign that something will happen
                 if nothing happens" (Bierce, from the pinned corpus: the same on every machine)
    ops1..ops4, units, word   the ladder's rungs: worked steps ending "The answer is N."
    man, stdlib  this machine's man pages and docstrings (machine-dependent; not in the defaults)
    arithmetic, units_short   "What is 17 + 25?" -> "42", the answer alone, no working

A Conversation is {"id", "kind", "messages": [user, assistant], "answer"}: `answer` is the
reference the oracle (minilm/post/oracles.py) judges against. An example is held out iff a hash
of its content-derived id falls under 10% (`split_of`), so train and held-out never
share a question, whatever n and seed are.

Preference pairs (Phi-3's DPO used chat-format and reasoning pairs; ours are checkable): the
chosen reply is the reference; the rejected one is a near miss, a truncated answer, a wrong
number, a wrong last step, or a reply that keeps going. The `reason` field says which.
"""

from __future__ import annotations

import ast
import random
import re
from functools import lru_cache
from pathlib import Path

from data_prep import sources
from data_prep.ladder import LADDER, ladder_problem
from data_prep.pinned import pinned_documents
from data_prep.stdlib_docs import stdlib_dir
from data_prep.synthetic import split_of, unit_conversion

DEFAULT_SOURCES = ("dictionary",) + LADDER
MAX_ANSWER_WORDS = 10
TEXT_KINDS = ("dictionary", "man", "stdlib")   # judged as phrases
WORKED_KINDS = LADDER + ("word_problem",)      # judged by the last number (GSM8K's rule)


def _conversation(example_id: str, kind: str, question: str, reply: str, answer: str) -> dict:
    return {"id": example_id, "kind": kind, "answer": answer,
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": reply}]}


# ---- real question-answer pairs

def _short(answer: str) -> bool:
    return 2 <= len(answer.split()) <= MAX_ANSWER_WORDS


@lru_cache(maxsize=None)
def man_qa(dirs: tuple[str, ...] | None = None) -> tuple[tuple[str, str], ...]:
    """(command, NAME-line description) for man pages of one-word commands with short NAME lines.

    Only the first 3 KB of each page is read: the NAME section comes first. Pages whose file
    name has "_" (the ~16,000 `gcloud_*` subcommand pages) are skipped.
    """
    dirs = [Path(d) for d in (dirs or sources.MAN_DIRS)]
    out, seen = [], set()
    for d in (d for d in dirs if d.is_dir()):
        for path in sorted(d.iterdir()):
            if not path.is_file() or path.is_symlink() or "_" in path.name:
                continue
            text = sources.roff_to_text(sources.read_text(path, max_bytes=3000))
            m = re.search(r"^NAME\n\n(.+?)(?:\n\n|$)", text, re.S | re.M)
            name, sep, desc = " ".join(m.group(1).split()).partition(" - ") if m else ("", "", "")
            name, desc = name.split(",")[0].strip(), desc.strip().rstrip(".")
            if sep and re.fullmatch(r"[a-z][a-z0-9.+-]{0,23}", name) and _short(desc) and name not in seen:
                seen.add(name)
                out.append((name, desc))
    return tuple(out)


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, without its full stop, or None."""
    para = " ".join(doc.split("\n\n")[0].split())
    m = re.match(r"(.+?)\.(?:\s|$)", para)
    if not m or re.search(r"\b(?:e\.g|i\.e|etc)$", m.group(1)):
        return None
    return m.group(1)


@lru_cache(maxsize=None)
def stdlib_qa(root: str | None = None) -> tuple[tuple[str, str], ...]:
    """(module.function, first docstring sentence) for public top-level stdlib functions.

    Sentences with markup or code ( ` : * ( ) [ ] = ...) or outside 2..MAX_ANSWER_WORDS words
    are skipped: the answer must be plain prose a small model can say.
    """
    root = Path(root) if root else stdlib_dir()
    paths = sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py"))
    out = []
    for path in paths:
        module = path.parent.name if path.name == "__init__.py" else path.stem
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                sentence = first_sentence(doc) if doc else None
                if sentence and _short(sentence) and not re.search(r"[`:*()\[\]{}<>=|\\]", sentence):
                    out.append((f"{module}.{node.name}", sentence))
    return tuple(sorted(set(out)))


@lru_cache(maxsize=None)
def dictionary_qa() -> tuple[tuple[str, str], ...]:
    """(word, first sentence of its definition) from The Devil's Dictionary in the pinned corpus."""
    out = []
    for doc in pinned_documents():
        if not doc.id.startswith("pinned/devils-dictionary"):
            continue
        for para in doc.text.split("\n\n"):   # an entry: "OMEN, n.  A sign that ..."
            m = re.match(r"([A-Z][A-Z' -]+), (?:n|v|adj|adv|pp|x|v\.t|v\.i|pro|prep|conj|interj)\.\s+(.+)",
                         " ".join(para.split()))
            sentence = m and first_sentence(m.group(2))
            if sentence and _short(sentence):
                out.append((m.group(1).strip().lower(), sentence))
    return tuple(sorted(set(out)))


def _real(kind: str) -> list[dict]:
    if kind == "dictionary":
        return [_conversation(f"dictionary/{w}", "dictionary",
                              f"What is {'an' if w[0] in 'aeiou' else 'a'} {w}, in The Devil's Dictionary?", d, d)
                for w, d in dictionary_qa()]
    if kind == "man":
        return [_conversation(f"man/{c}", "man", f"What does the command `{c}` do?", d, d)
                for c, d in man_qa()]
    return [_conversation(f"stdlib/{f}", "stdlib", f"What does `{f}` do?", s, s) for f, s in stdlib_qa()]


# ---- synthetic, computed answers

def _arithmetic(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 50), rng.randint(0, 50))
    if op == "-" and b > a:
        a, b = b, a  # answers stay non-negative
    value = str({"+": a + b, "-": a - b, "*": a * b}[op])
    return _conversation(f"arith/{a}{op}{b}", "arithmetic", f"What is {a} {op} {b}?", value, value)


def _units_short(rng: random.Random) -> dict:
    question, answer = unit_conversion(rng)
    return _conversation(f"units/{question}", "units_short", question, str(answer), str(answer))


def _rung(rung: str):
    def make(rng: random.Random) -> dict:
        p = ladder_problem(rung, rng)
        return _conversation(p["id"], rung, p["question"], p["worked"], str(p["answer"]))
    return make


def _word_problem(rng: random.Random) -> dict:   # the ladder's top rung under its older name
    return {**_rung("word")(rng), "kind": "word_problem"}


SYNTHETIC = {"arithmetic": _arithmetic, "units_short": _units_short, "word_problem": _word_problem,
             **{rung: _rung(rung) for rung in LADDER}}


def _synthetic(kind: str, count: int, rng: random.Random, split: str) -> list[dict]:
    out, seen = [], set()
    for _ in range(count * 50):  # bounded: a kind with few distinct questions stops early
        if len(out) == count:
            break
        ex = SYNTHETIC[kind](rng)
        if ex["id"] not in seen and (split == "all" or split_of(ex["id"]) == split):
            seen.add(ex["id"])
            out.append(ex)
    return out


def instruction_examples(n: int, seed: int = 0, sources=DEFAULT_SOURCES, split: str = "all") -> list[dict]:
    """`n` conversations (fewer if the sources run out), an equal share per source, shuffled.

    Real sources contribute what they have up to their share; synthetic ones fill the rest.
    split: "train", "heldout" or "all" (see `split_of`).
    """
    unknown = set(sources) - set(TEXT_KINDS) - set(SYNTHETIC)
    if unknown or not sources:
        raise ValueError(f"unknown instruction sources {sorted(unknown)}; choose from "
                         f"{TEXT_KINDS + tuple(SYNTHETIC)}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    rng = random.Random(seed)
    real = [s for s in sources if s in TEXT_KINDS]
    out = []
    for kind in real:
        pool = [ex for ex in _real(kind) if split == "all" or split_of(ex["id"]) == split]
        out += rng.sample(pool, min(len(pool), n // len(sources)))
    synthetic = [s for s in sources if s in SYNTHETIC]
    for i, kind in enumerate(synthetic):
        share = (n - len(out)) // (len(synthetic) - i)
        out += _synthetic(kind, share, rng, split)
    rng.shuffle(out)
    return out


def split_examples(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by `split_of` each example's id."""
    train = [ex for ex in examples if split_of(ex["id"]) == "train"]
    return train, [ex for ex in examples if split_of(ex["id"]) == "heldout"]


# ---- offline preference pairs

def _wrong_worked(ex: dict, rng: random.Random) -> str:
    """The worked solution with its last result (and so the final answer) off by a few."""
    *steps, last, _ = ex["messages"][1]["content"].split("\n")
    right = int(ex["answer"])
    wrong = right + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    last = re.sub(rf"\b{right}(\.?)$", rf"{wrong}\g<1>", last)   # "68 - 12 = 56" and "..., which is 56."
    return "\n".join([*steps, last, f"The answer is {wrong}."])


def _rejected(ex: dict, others: list[dict], rng: random.Random) -> tuple[str, str] | None:
    """(rejected reply, reason) for one example, or None if no checkable flaw applies."""
    answer, kind = ex["answer"], ex["kind"]
    other = rng.choice([o for o in others if o["kind"] == kind and o["answer"] != answer] or [None])
    if kind in WORKED_KINDS:
        return _wrong_worked(ex, rng), "wrong worked answer: the last step is miscalculated"
    choice = rng.choice(["near_miss", "truncated", "rambles"])
    if kind not in TEXT_KINDS and choice != "rambles":
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])), "wrong number"
    if choice == "near_miss" and other is not None:
        return other["answer"], "another entry's answer (a near miss)"
    if choice == "truncated" and len(answer.split()) >= 3:
        words = answer.split()
        return " ".join(words[: len(words) // 2]), "truncated answer"
    if other is not None:
        return f"{answer} {other['answer']}", "keeps going after the answer"
    return None


def preference_pairs(n: int, seed: int = 0, sources=DEFAULT_SOURCES,
                     split: str = "all") -> list[dict]:
    """`n` pairs {id, kind, prompt (messages), chosen, rejected, reason, answer}, checkable by
    AnswerOracle: chosen is the reference reply, rejected carries one known flaw."""
    rng = random.Random(seed + 7919)  # not the same draws as instruction_examples(seed)
    examples = instruction_examples(n, seed, sources, split)
    pairs = []
    for ex in examples:
        made = _rejected(ex, examples, rng)
        if made is not None:
            pairs.append({"id": ex["id"], "kind": ex["kind"], "prompt": ex["messages"][:1],
                          "chosen": ex["messages"][1]["content"], "rejected": made[0],
                          "reason": made[1], "answer": ex["answer"]})
    return pairs
