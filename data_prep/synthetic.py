"""Synthetic textbook-style documents, correct by construction (lesson 05).

    from data_prep.synthetic import SyntheticConfig, synthetic_documents, word_problem
    docs = list(synthetic_documents(SyntheticConfig(n_documents=1000, seed=0)))
    question, answer = word_problem(random.Random(1))

phi-1 and phi-1.5 (arXiv 2306.11644, 2309.05463) train on "textbook quality" text that a large
model writes, kept diverse by seeding each prompt with random topics and audiences. We have no
large model, so each generator is a small function of a `random.Random` that combines a topic, a
template and random numbers, and COMPUTES every number it states: word-problem steps are applied
with `_apply`, code outputs come from actually running the program. Deviations from the papers:
templates instead of an LLM (far less varied prose), and only four kinds (word problems, unit
conversions, tiny Python programs, short explanatory passages). Each document's `meta` keeps the
structured facts (steps, program, output) so tests can re-derive every answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import operator
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_prep.document import Document

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas"]
ITEMS = ["pencil", "notebook", "apple", "ticket", "marble", "sticker", "book", "cookie", "card"]
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
SAY = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _apply(op: str, a: int, b: int) -> int:
    if op == "/" and a % b:
        raise ValueError(f"division steps must be exact, got {a} / {b}")
    return OPS[op](a, b)


def _solution(steps: list[tuple[str, int, str, int]]) -> tuple[list[list], str, int]:
    """Compute each step (phrase, a, op, b); returns (structured steps, worked text, answer)."""
    rows, lines = [], []
    for phrase, a, op, b in steps:
        r = _apply(op, a, b)
        rows.append([a, op, b, r])
        lines.append(f"{phrase} {a} {SAY[op]} {b}, which is {r}.")
    return rows, "\n".join(lines), rows[-1][3]


def split_of(example_id: str, heldout_fraction: float = 0.1) -> str:
    """'heldout' or 'train', a pure function of the id (first 8 bytes of its SHA-256): the split every
    generated question belongs to (the skill ladder's, instructions', and the documents' here)."""
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


# ---- word problems (GSM8K shape: 2-4 steps, integer answer)

def _shopping(rng):
    n, a, b = rng.choice(NAMES), *rng.sample(ITEMS, 2)
    na, pa, nb, pb = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    bill = ((na * pa + nb * pb) // 10 + rng.randint(1, 3)) * 10
    q = (f"{n} buys {na} {a}s at {pa} dollars each and {nb} {b}s at {pb} dollars each. "
         f"{n} pays with {bill} dollars. How much change does {n} get back?")
    return q, [(f"The cost of the {a}s is", na, "*", pa), (f"The cost of the {b}s is", nb, "*", pb),
               ("Together they cost", na * pa, "+", nb * pb),
               ("The change is", bill, "-", na * pa + nb * pb)]


def _sharing(rng):
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per, friends = rng.randint(2, 9), rng.randint(4, 12), rng.randint(2, 6)
    share = rng.randint(1, (boxes * per - 1) // friends)  # so that at least one is kept
    keep = boxes * per - share * friends
    q = (f"{n} has {boxes} boxes with {per} {item}s in each box. {n} keeps {keep} of the {item}s "
         f"and shares the rest equally among {friends} friends. How many {item}s does each "
         f"friend get?")
    return q, [(f"The number of {item}s is", boxes, "*", per),
               ("After keeping some, the number left is", boxes * per, "-", keep),
               ("Each friend gets", share * friends, "/", friends)]


def _travel(rng):
    n = rng.choice(NAMES)
    s1, h1, s2, h2 = rng.randint(3, 60), rng.randint(2, 5), rng.randint(3, 60), rng.randint(2, 5)
    q = (f"{n} rides a bike at {s1} kilometres per hour for {h1} hours, then takes a bus at {s2} "
         f"kilometres per hour for {h2} hours. How many kilometres does {n} travel in all?")
    return q, [("The distance by bike is", s1, "*", h1), ("The distance by bus is", s2, "*", h2),
               ("The total distance is", s1 * h1, "+", s2 * h2)]


def _savings(rng):
    n = rng.choice(NAMES)
    weekly, weeks, gift = rng.randint(3, 25), rng.randint(2, 12), rng.randint(5, 50)
    spent = rng.randint(1, weekly * weeks + gift)
    q = (f"{n} saves {weekly} dollars every week for {weeks} weeks. A grandparent adds a gift of "
         f"{gift} dollars, and then {n} spends {spent} dollars on a game. How many dollars are "
         "left?")
    return q, [("The weekly savings add up to", weekly, "*", weeks),
               ("With the gift, the total is", weekly * weeks, "+", gift),
               ("After the purchase, what is left is", weekly * weeks + gift, "-", spent)]


WORD_TEMPLATES = [_shopping, _sharing, _travel, _savings]


def word_problem_steps(rng: random.Random) -> tuple[str, list[list], str, int]:
    """(question, structured steps [a, op, b, result], worked solution text, answer)."""
    question, steps = rng.choice(WORD_TEMPLATES)(rng)
    rows, worked, answer = _solution(steps)
    return question, rows, worked, answer


def word_problem(rng: random.Random) -> tuple[str, int]:
    question, _, _, answer = word_problem_steps(rng)
    return question, answer


# ---- unit conversions: (big unit, small unit, how many small units in one big unit)

UNITS = [("kilometre", "metre", 1000), ("metre", "centimetre", 100), ("foot", "inch", 12),
         ("yard", "foot", 3), ("mile", "yard", 1760), ("kilogram", "gram", 1000),
         ("pound", "ounce", 16), ("litre", "millilitre", 1000), ("gallon", "quart", 4),
         ("hour", "minute", 60), ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7)]


def _plural(unit: str, n: int) -> str:
    return unit if n == 1 else {"foot": "feet", "inch": "inches"}.get(unit, unit + "s")


def unit_conversion_steps(rng: random.Random) -> tuple[str, list[list], str, int]:
    big, small, factor = rng.choice(UNITS)
    count = rng.randint(2, 40)
    if rng.random() < 0.5:  # big -> small: multiply
        q, calc = f"How many {_plural(small, 2)} are in {count} {_plural(big, count)}?", "*"
    else:  # small -> big: divide a quantity built to be a whole number of big units
        q, calc = f"How many {_plural(big, 2)} are {count * factor} {_plural(small, 2)}?", "/"
    a = count if calc == "*" else count * factor
    phrase = f"One {big} is {factor} {_plural(small, factor)}, so we work out"
    rows, worked, answer = _solution([(phrase, a, calc, factor)])
    return q, rows, worked, answer


def unit_conversion(rng: random.Random) -> tuple[str, int]:
    question, _, _, answer = unit_conversion_steps(rng)
    return question, answer


# ---- tiny Python programs, outputs obtained by running them

SAFE_BUILTINS = {f.__name__: f for f in (print, range, len, sorted, sum, min, max, str, int, list,
                                         dict, enumerate, abs, reversed)}


def run_program(src: str) -> str:
    """Run `src` with only a few builtins (no imports) and return what it printed. This keeps our
    own templates honest; it is not a sandbox for untrusted code."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(src, {"__builtins__": SAFE_BUILTINS})
    return buf.getvalue()


WORDS = ["python", "garden", "planet", "river", "window", "teacher", "number", "bridge", "silver"]
HOW = {  # topic -> the explanation that goes in the solution
    "a for loop that adds up values": "The loop variable i takes each value in the range in turn, "
    "and the loop adds i times a constant to the running total.",
    "string slicing and string methods": "A slice with a step of minus one walks the string "
    "backwards, and the upper method returns a copy in capital letters.",
    "a list comprehension with a condition": "The comprehension keeps only the numbers whose "
    "remainder after division by two matches the condition, and then multiplies each of them.",
    "a while loop that counts steps": "Each pass through the loop halves an even number, or "
    "triples an odd number and adds one, and the counter records how many passes it takes.",
    "a dictionary that counts words": "The get method returns the count of a word seen so far, or "
    "zero when the word is new, and the loop stores the count plus one.",
    "enumerate and string formatting": "The enumerate function pairs each name with a number that "
    "starts from the given value, and the names are sorted before the loop begins.",
}


def _programs(rng) -> list[str]:
    """One program per topic in HOW (same order), with random constants."""
    a, k, w = rng.randint(0, 5), rng.randint(2, 9), rng.choice(WORDS)
    nums = [rng.randint(1, 30) for _ in range(rng.randint(4, 8))]
    return [
        f"total = 0\nfor i in range({a}, {a + rng.randint(3, 8)}):\n    total += i * {k}\n"
        "print(total)",
        f'word = "{w}"\nprint(word[::-1])\nprint(word.upper())\nprint(len(word) * {k})',
        f"nums = {nums}\npicked = [n * {k} for n in nums if n % 2 == {rng.randint(0, 1)}]\n"
        "print(picked)",
        f"n = {rng.randint(3, 40)}\nsteps = 0\nwhile n != 1:\n"
        "    n = n // 2 if n % 2 == 0 else 3 * n + 1\n    steps += 1\nprint(steps)",
        f'text = "{" ".join(rng.choices(WORDS[:4], k=6))}"\ncounts = {{}}\n'
        "for word in text.split():\n    counts[word] = counts.get(word, 0) + 1\nprint(counts)",
        f"names = {rng.sample(NAMES, 3)}\n"
        f"for i, name in enumerate(sorted(names), start={a}):\n    print(i, name.lower())",
    ]


def code_exercise(rng: random.Random) -> tuple[str, str, str, str]:
    """(what the program shows, how it works, program source, its printed output)."""
    topic, src = rng.choice(list(zip(HOW, _programs(rng))))
    return topic, HOW[topic], src, run_program(src)


# ---- short explanatory passages with worked examples

def _fractions(rng):
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    num, den = a * d + c * b, b * d
    g = math.gcd(num, den)
    return ("Adding fractions", "To add two fractions, we first write them over a common "
            "denominator. Multiplying the two denominators always gives one that works. Then we "
            "add the numerators and simplify by dividing the top and the bottom by their greatest "
            f"common divisor.\n\nFor example, to add {a}/{b} and {c}/{d}, we rewrite them as "
            f"{a * d}/{den} and {c * b}/{den}. Their sum is {num}/{den}. The greatest common "
            f"divisor of {num} and {den} is {g}, so the sum in lowest terms is "
            f"{num // g}/{den // g}.")


def _percentages(rng):
    p, base = rng.choice([5, 10, 20, 25, 50, 75]), rng.randint(1, 40) * 20
    return ("Percentages", "A percentage is a fraction with a denominator of one hundred. To find "
            "a percentage of an amount, we multiply the amount by the percentage and divide the "
            f"result by one hundred.\n\nFor example, a shop lowers the price of a coat that costs "
            f"{base} dollars by {p} percent. The discount is {base} times {p} divided by 100, "
            f"which is {base * p // 100} dollars, so the new price is {base - base * p // 100} "
            "dollars.")


def _primes(rng):
    n = rng.randint(10, 30)
    primes = [k for k in range(2, n + 1) if all(k % j for j in range(2, int(k ** 0.5) + 1))]
    m = rng.randint(2, 9) * rng.randint(2, 9)
    f = min(j for j in range(2, m + 1) if m % j == 0)
    return ("Prime numbers", "A prime number is a whole number greater than one that has no "
            "divisors other than one and itself. To check whether a number is prime, it is enough "
            "to try the divisors up to its square root.\n\nFor example, the primes up to "
            f"{n} are {', '.join(map(str, primes))}, which makes {len(primes)} of them. The "
            f"number {m} is not prime, because it can be divided by {f} and gives {m // f}.")


def _averages(rng):
    k = rng.randint(3, 6)
    vals = [rng.randint(45, 100) for _ in range(k)]
    vals[-1] -= sum(vals) % k  # nudge the last score so the mean is a whole number
    mean = sum(vals) // k
    who = rng.choice(NAMES)
    return ("Averages", "The average, or mean, of a list of numbers is their sum divided by how "
            "many numbers there are. It tells us the value each item would have if the total were "
            f"shared out equally.\n\nFor example, {who} scored {', '.join(map(str, vals))} on "
            f"{k} tests. The sum of the scores is {sum(vals)}, and {sum(vals)} divided by {k} is "
            f"{sum(vals) // k}, so the average score is {mean}.")


def _rates(rng):
    rate, hours = rng.randint(2, 30), rng.randint(2, 12)
    item, more = rng.choice(ITEMS), rng.randint(2, 9)
    return ("Rates", "A rate compares two quantities measured in different units, such as "
            "kilometres per hour or items per minute. Once we know the rate for one unit, we can "
            "scale it up to any number of units.\n\nFor example, a machine makes "
            f"{rate * hours} {item}s in {hours} hours. Its rate is {rate * hours} divided by "
            f"{hours}, which is {rate} {item}s per hour. In {more} hours it would make "
            f"{rate * more} {item}s.")


PASSAGES = [_fractions, _percentages, _primes, _averages, _rates]

# ---- documents: prose around each exercise

OPENINGS = {  # kind -> (first sentences to choose from, the sentence that follows)
    "word_problem": (["Many everyday questions can be answered by breaking them into small steps.",
                      "A word problem hides a short calculation inside a story.",
                      "When solving a problem with several steps, write down each step and its "
                      "result before moving on."],
                     "We find the value of each part, and then we combine the parts to reach the "
                     "answer."),
    "conversion": (["To change a measurement from one unit to another, we use the number of small "
                    "units in one large unit.", "Going from a larger unit to a smaller one means "
                    "multiplying, and going the other way means dividing.",
                    "Units of length, mass, volume and time are all related by fixed factors."],
                   "It helps to check that the answer has a sensible size: there should be more "
                   "of the small units than of the large ones."),
    "code": (["Reading code and predicting what it does is one of the best ways to learn a "
              "programming language.", "Before running a program, try to trace it by hand, "
              "keeping track of the value of each variable.",
              "A good habit is to follow a program line by line, as the computer would."],
             "Read the program carefully and work out the output yourself before you look at the "
             "solution."),
}


def _opening(rng, kind: str) -> str:
    first, then = OPENINGS[kind]
    return f"{rng.choice(first)} {then}"


def _exercise_doc(kind, make_steps, rung):
    """A document builder for `kind` around a (question, steps, worked text, answer) generator; its
    questions come from the skill ladder's train split only (`rung`: the ladder rung it shares)."""
    def build(rng):
        q, rows, worked, answer = make_steps(rng)
        while split_of(f"{rung}/{q}") != "train":   # never pretrain on an evaluation question
            q, rows, worked, answer = make_steps(rng)
        text = (f"{_opening(rng, kind)}\n\nExercise: {q}\n\nSolution:\n{worked}\n"
                f"So the answer to the question is {answer}.\nAnswer: {answer}")
        return text, {"question": q, "steps": rows, "answer": answer}
    return build


def _code_doc(rng):
    topic, how, src, out = code_exercise(rng)
    text = (f"This example shows {topic}. {_opening(rng, 'code')}\n\n"
            f"Exercise: What does this print?\n\n```python\n{src}\n```\n\n"
            f"Solution: {how} When we run the program, it prints the following.\n\n```\n{out}```")
    return text, {"program": src, "output": out, "topic": topic}


def _passage_doc(rng):
    title, body = rng.choice(PASSAGES)(rng)
    return f"{title}\n\n{body}", {"topic": title}


GENERATORS = {"word_problem": _exercise_doc("word_problem", word_problem_steps, "word"),
              "conversion": _exercise_doc("conversion", unit_conversion_steps, "units"),
              "code": _code_doc, "passage": _passage_doc}


@dataclass
class SyntheticConfig:
    n_documents: int = 1000
    seed: int = 0
    mix: dict = field(default_factory=lambda: {"word_problem": 0.35, "conversion": 0.15,
                                               "code": 0.25, "passage": 0.25})


def synthetic_documents(cfg: SyntheticConfig) -> Iterator[Document]:
    """Deterministic for a seed; ids are "synthetic/<kind>/<n>" with n the document's index."""
    rng = random.Random(cfg.seed)
    kinds, weights = list(cfg.mix), list(cfg.mix.values())
    for i in range(cfg.n_documents):
        kind = rng.choices(kinds, weights)[0]
        text, meta = GENERATORS[kind](rng)
        yield Document(id=f"synthetic/{kind}/{i}", source="synthetic", text=text,
                       meta={"kind": kind, **meta})
