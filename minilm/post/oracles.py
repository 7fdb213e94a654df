"""AnswerOracle: judge a reply against the known reference answer and the chat format.

    from minilm.post.oracles import AnswerOracle
    oracle = AnswerOracle(instruction_examples(500, seed=1, split="heldout"))
    oracle.reward(prompt, "list directory contents<|end|>")     # 1.0
    oracle.prefer(prompt, reply_a, reply_b)                    # P(a beats b)
    oracle.judge(prompt, reply)                                # the parts: correct, in_form, ended

An oracle is a plain object (DESIGN.md: "never require a model where a function serves"): DPO's
held-out judgement, the preference builder and later RL stages all call `reward`/`prefer`.

What a reply is. A string: the assistant's text. If it contains "<|end|>" it is cut there and
counts as ended. If another special-token string comes first ("<|user|>", "<|endoftext|>", ...)
it is cut there and counts as NOT ended (the model ran on into a new turn). A string with no
special token is a complete message content, ended (the convention of chat data, where
render_chat appends <|end|>); for a sampled reply that stopped at max_new_tokens, pass
`ended=False`, or pass parse_reply's (text, ended).

What "correct" means, and why:
  numbers (arithmetic, units): the reply, normalised, is exactly the integer. A near number is
      wrong: partial credit would reward guessing digits.
  word_problem: the LAST integer in the reply equals the answer (GSM8K's rule), and the
      expected form is a reply that ends "The answer is N."
  phrases (man, stdlib): exact match after normalisation (lowercase, strip punctuation and
      backticks, collapse spaces) is correct; otherwise the token F1 with the reference earns
      half credit, as SQuAD/HotpotQA score free text. Exact match alone would give a small model
      no signal for "list the directory contents" vs "list directory contents".

reward = 0.6 * correctness + 0.2 * in_form + 0.2 * ended, in [0, 1]:
  correctness  1 if correct, else 0.5 * F1 for phrases, else 0
  in_form      the reply looks like the expected kind of answer: a bare integer for numbers;
               one line of 1..MAX_FORM_WORDS words for phrases; "...The answer is N." for word problems
  ended        the reply closed its turn with <|end|>
prefer(a, b) = sigmoid((reward(a) - reward(b)) / temperature): Bradley-Terry on the reward,
0.5 on ties, ~0.88 for a 0.2 difference at temperature 0.1.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

SPECIAL_STRINGS = ("<|end|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
NUMERIC_KINDS = ("arithmetic", "units")
MAX_FORM_WORDS = 16
_PUNCT = str.maketrans("", "", string.punctuation.replace("-", "").replace(".", "") + "`")


def normalise(text: str) -> str:
    """Lowercase, drop punctuation/backticks (keep '-' and inner '.'), collapse whitespace."""
    text = text.lower().translate(_PUNCT).strip().rstrip(".")
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised word multisets (SQuAD's free-text score)."""
    p, r = normalise(prediction).split(), normalise(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def split_reply(response: str, ended: bool | None = None) -> tuple[str, bool]:
    """(text, ended) of a reply string under the rules in the module docstring."""
    cuts = [(response.find(s), s) for s in SPECIAL_STRINGS if s in response]
    if cuts:
        pos, token = min(cuts)
        return response[:pos].strip(), token == "<|end|>"
    return response.strip(), True if ended is None else bool(ended)


def _question(prompt) -> str:
    """The last user message of a prompt given as messages, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt has no user message; the oracle looks questions up by it")
    return users[-1]


class AnswerOracle:
    """Judges replies to known questions; built from conversations or preference pairs."""

    def __init__(self, conversations, temperature: float = 0.1):
        self.temperature = temperature
        self.references: dict[str, tuple[str, str]] = {}   # question -> (answer, kind)
        for c in conversations:
            prompt = c["prompt"] if "prompt" in c else c["messages"]
            self.references[_question(prompt)] = (str(c["answer"]), c["kind"])

    def reference(self, prompt) -> tuple[str, str]:
        question = _question(prompt)
        if question not in self.references:
            raise KeyError(f"the oracle has no reference answer for {question[:80]!r}; build it "
                           f"from the conversations the prompts come from")
        return self.references[question]

    def judge(self, prompt, response: str, ended: bool | None = None) -> dict:
        """{"correct", "in_form", "ended", "f1", "reward"} for one reply."""
        answer, kind = self.reference(prompt)
        text, ended = split_reply(response, ended)
        f1 = token_f1(text, answer)
        if kind in NUMERIC_KINDS:
            in_form = re.fullmatch(r"-?\d+", normalise(text)) is not None
            correct = in_form and int(normalise(text)) == int(answer)
            credit = float(correct)
        elif kind == "word_problem":
            numbers = re.findall(r"-?\d+", text)
            in_form = re.search(r"The answer is -?\d+\.?$", text) is not None
            correct = bool(numbers) and int(numbers[-1]) == int(answer)
            credit = float(correct)
        else:
            in_form = "\n" not in text and 1 <= len(text.split()) <= MAX_FORM_WORDS
            correct = normalise(text) == normalise(answer)
            credit = 1.0 if correct else 0.5 * f1
        reward = 0.6 * credit + 0.2 * in_form + 0.2 * ended
        return {"correct": bool(correct), "in_form": bool(in_form), "ended": bool(ended),
                "f1": f1, "reward": reward}

    def reward(self, prompt, response: str, ended: bool | None = None) -> float:
        return self.judge(prompt, response, ended)["reward"]

    def prefer(self, prompt, a: str, b: str) -> float:
        """P(a beats b) = sigmoid((reward(a) - reward(b)) / temperature)."""
        diff = self.reward(prompt, a) - self.reward(prompt, b)
        return 1.0 / (1.0 + math.exp(-diff / self.temperature))
