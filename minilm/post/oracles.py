"""Oracles: judge replies against known reference answers (AnswerOracle) or compare two (DNO's).

    from minilm.post.oracles import AnswerOracle
    oracle = AnswerOracle(instruction_examples(500, seed=1, split="heldout"))
    oracle.reward(prompt, "list directory contents<|end|>")     # 1.0
    oracle.prefer(prompt, reply_a, reply_b)                    # P(a beats b)
    oracle.judge(prompt, reply)                                # the parts: correct, in_form, ended

An oracle is a plain object, not a model: SFT's and DPO's held-out judgements, the preference
builder and the RL stages all call `reward`/`prefer`. AnswerOracle (lesson 06):

    reward = 0.6 * correctness + 0.2 * in_form + 0.2 * ended          in [0, 1]
    prefer(a, b) = sigmoid((reward(a) - reward(b)) / temperature)     Bradley-Terry on the reward

correctness is exact for numbers, the last integer for word problems (GSM8K's rule), and for
phrases exact match after `normalise`, else half the token F1 (SQuAD's free-text score).

General preference oracles for DNO (Rosset et al. 2024, arXiv 2404.03715; lesson 09), each with
`prefer(prompt, a, b)`, batched `prefer_many(triples)`, a cache and a counter `calls`:
  VerifierOracle     checkable answers on a 0..6 scale shaped like the paper's 6-point rubric
  RewardModelOracle  a Bradley-Terry reward model (minilm/post/reward.py): P = sigmoid(r_a - r_b)
  JudgeOracle        asks a minilm model "which answer is better, A or B?" in both orders
  CyclicOracle       a preference table with a cycle (rock < paper < scissors < rock)
Deviation: the paper's oracle is GPT-4-Turbo with a rubric; ours checks reference answers.
"""

from __future__ import annotations

import math
import re
import string
from abc import ABC, abstractmethod
from collections import Counter

import torch

from data_prep.instructions import WORKED_KINDS
from minilm.generate import left_pad
from minilm.post.chat import collate, render_chat, render_prompt

SPECIAL_STRINGS = ("<|end|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
NUMERIC_KINDS = ("arithmetic", "units_short")   # the answer alone
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
    """(text, ended) of a reply string: the assistant's text and whether it closed its turn.

    A reply containing "<|end|>" is cut there and counts as ended. If another special-token string
    comes first ("<|user|>", "<|endoftext|>", ...) it is cut there and counts as NOT ended (the
    model ran on into a new turn). A string with no special token is complete message content,
    ended (the convention of chat data, where render_chat appends <|end|>); for a sampled reply that
    stopped at max_new_tokens, pass `ended=False`, or pass parse_reply's (text, ended).
    """
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
        if kind in NUMERIC_KINDS:       # exact integers: a near number is wrong (no credit for guessing digits)
            in_form = re.fullmatch(r"-?\d+", normalise(text)) is not None
            correct = in_form and int(normalise(text)) == int(answer)
            credit = float(correct)
        elif kind in WORKED_KINDS:      # GSM8K's rule: the LAST integer of the reply is the answer
            numbers = re.findall(r"-?\d+", text)
            in_form = re.search(r"The answer is -?\d+\.?$", text) is not None
            correct = bool(numbers) and int(numbers[-1]) == int(answer)
            credit = float(correct)
        else:                           # phrases: exact after normalise, else half the F1 as credit
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


# ---- general preference oracles for DNO: cached, batched, counted

class CachedOracle(ABC):
    """prefer/prefer_many over a cache; subclasses implement `_compare(triples) -> [P(a beats b)]`.

    `calls` counts evaluations made (cache misses), `requests` everything asked: the oracle
    budget of a run is `calls`. Keys use the question text, so a prompt given as messages or as
    its string hits the same entry.
    """

    def __init__(self):
        self._pref_cache: dict[tuple, float] = {}
        self.count_comparisons = True    # False for score oracles: their budget is the scores
        self.calls = 0
        self.requests = 0

    def prefer_many(self, triples) -> list[float]:
        keys = [(_question(p), a, b) for p, a, b in triples]
        self.requests += len(keys)
        missing = list(dict.fromkeys(k for k in keys if k not in self._pref_cache))   # unique, in order
        if missing:
            self.calls += len(missing) if self.count_comparisons else 0
            for k, v in zip(missing, self._compare(missing)):
                self._pref_cache[k] = float(v)
        return [self._pref_cache[k] for k in keys]

    def prefer(self, prompt, a: str, b: str) -> float:
        return self.prefer_many([(prompt, a, b)])[0]

    @abstractmethod
    def _compare(self, triples: list[tuple[str, str, str]]) -> list[float]:
        """P(a beats b) for each uncached (question, a, b): what a concrete oracle computes."""


class ScoreOracle(CachedOracle):
    """An oracle with a point-wise score: one cached score per (question, reply); prefer compares."""

    def __init__(self):
        super().__init__()
        self.count_comparisons = False
        self._score_cache: dict[tuple, float] = {}

    def score_many(self, prompts, replies) -> list[float]:
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        keys = [(_question(p), r) for p, r in zip(prompts, replies)]
        self.requests += len(keys)
        missing = list(dict.fromkeys(k for k in keys if k not in self._score_cache))
        if missing:
            self.calls += len(missing)
            for k, v in zip(missing, self._score(missing)):
                self._score_cache[k] = float(v)
        return [self._score_cache[k] for k in keys]

    def score(self, prompt, reply: str) -> float:
        return self.score_many([prompt], [reply])[0]

    def _compare(self, triples):
        a = self.score_many([q for q, _, _ in triples], [x for _, x, _ in triples])
        b = self.score_many([q for q, _, _ in triples], [y for _, _, y in triples])
        return [self.from_scores(x, y) for x, y in zip(a, b)]

    def from_scores(self, a: float, b: float) -> float:
        return 1.0 if a > b else 0.0 if a < b else 0.5

    @abstractmethod
    def _score(self, items: list[tuple[str, str]]) -> list[float]:
        """A score for each uncached (question, reply): what a concrete point-wise oracle computes."""


class VerifierOracle(ScoreOracle):
    """0..6 points per reply, the DNO paper's additive rubric mapped onto checkable answers:

      +1 ended (closed its turn)            ~ "answer-formatted"
      +1 in the expected form               ~ "relevant"
      +1 right ballpark (numbers: same digit count; text: any word overlap; ~ "substantial")
      +1 nearly correct (numbers within 10%; text: F1 >= 0.5)   ~ "nearly all correct"
      +1 correct                            ~ "correct and well organised"
      +1 correct AND brief (numbers: a bare integer; text: <= MAX_FORM_WORDS words; worked
         solutions: at most twice the reference's words)           ~ "also concise and expert"
    A wrong reply scores at most 4, so a positive with >= 5 points is always a correct one:
    correctness first, then brevity/format. prefer is 1 / 0.5 / 0 by the points (a hard judge).
    """

    def __init__(self, conversations):
        super().__init__()
        self.answers = AnswerOracle(conversations)

    def _score(self, items):
        return [self.points(q, r) for q, r in items]

    def points(self, prompt, response: str, ended: bool | None = None) -> int:
        answer, kind = self.answers.reference(prompt)
        j = self.answers.judge(prompt, response, ended)
        text, _ = split_reply(response, ended)
        if kind in NUMERIC_KINDS or kind in WORKED_KINDS:
            numbers = re.findall(r"-?\d+", text)
            got, want = (int(numbers[-1]) if numbers else None), int(answer)
            ballpark = got is not None and len(str(abs(got))) == len(str(abs(want)))
            near = got is not None and abs(got - want) <= 0.1 * max(1, abs(want))
            limit = 1 if kind in NUMERIC_KINDS else 2 * len(answer.split()) + 40   # "brief": max words
        else:
            ballpark, near, limit = j["f1"] > 0, j["f1"] >= 0.5, MAX_FORM_WORDS
        brief = j["correct"] and len(text.split()) <= limit
        return int(j["ended"]) + int(j["in_form"]) + int(ballpark) + int(near) + int(j["correct"]) + int(brief)


class RewardModelOracle(ScoreOracle):
    """Scores replies with a reward model's head; prefer = sigmoid((r_a - r_b) / temperature).

    hydra: a HydraModel (minilm.post.reward.load_reward_model); replies are rendered as chats
    (minilm/post/chat.py) and scored in batches of batch_size.
    """

    def __init__(self, hydra, tokenizer, head: str = "reward", temperature: float = 1.0,
                 batch_size: int = 64, max_len: int = 256):
        super().__init__()
        self.hydra, self.tokenizer, self.head = hydra.eval(), tokenizer, head
        self.temperature, self.batch_size, self.max_len = temperature, batch_size, max_len

    @torch.no_grad()
    def _score(self, items):
        device = next(self.hydra.parameters()).device
        scores = []
        for i in range(0, len(items), self.batch_size):
            rows = [render_chat(self.tokenizer, [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": split_reply(r)[0]}])
                    for q, r in items[i:i + self.batch_size]]
            batch = collate(rows, self.tokenizer.eot_id, self.max_len)
            scores += self.hydra.score(batch["tokens"].to(device), batch["attention_mask"].to(device),
                                       self.head).tolist()
        return scores

    def from_scores(self, a: float, b: float) -> float:
        return 1.0 / (1.0 + math.exp(-(a - b) / self.temperature))


class JudgeOracle(CachedOracle):
    """Asks a minilm chat model to compare two answers: P(a) = softmax over its next token "A"/"B".

    Both orders are asked and averaged (P = (P_AB(A) + 1 - P_BA(A)) / 2), which cancels the
    judge's position bias. A ~1M-parameter judge was never trained to compare, so expect it near
    0.5: the interface is the point; a stronger checkpoint drops in.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.ids = [tokenizer.encode(x)[0] for x in ("A", "B")]

    def _prompt(self, q: str, a: str, b: str) -> list[int]:
        text = (f"Question: {q}\nAnswer A: {split_reply(a)[0]}\nAnswer B: {split_reply(b)[0]}\n"
                f"Which answer is better? Reply A or B.")
        return render_prompt(self.tokenizer, [{"role": "user", "content": text}])

    @torch.no_grad()
    def _p_first(self, pairs: list[tuple[str, str, str]]) -> list[float]:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(pairs), self.batch_size):
            prompts = [self._prompt(*t)[-self.model.config.max_seq_len:] for t in pairs[i:i + self.batch_size]]
            tokens, mask = left_pad(prompts, self.tokenizer.eot_id, device)
            logits = self.model(tokens, attention_mask=mask)[0][:, -1, self.ids]   # (B, 2): "A", "B"
            out += logits.float().softmax(-1)[:, 0].tolist()
        return out

    def _compare(self, triples):
        ab = self._p_first(triples)
        ba = self._p_first([(q, b, a) for q, a, b in triples])
        return [(x + 1.0 - y) / 2 for x, y in zip(ab, ba)]


RPS = ("rock", "paper", "scissors")
RPS_TABLE = ((0.5, 0.1, 0.8), (0.9, 0.5, 0.3), (0.2, 0.7, 0.5))   # P(row beats column): a cycle


class CyclicOracle(CachedOracle):
    """Preferences from a fixed table over categories, e.g. rock-paper-scissors (rock < paper <
    scissors < rock, with unequal margins so the von Neumann winner is not uniform).

    A reply's category is the first category name it mentions; a reply naming none loses to
    every reply that names one (P = 0) and ties other such replies.
    """

    def __init__(self, categories=RPS, table=RPS_TABLE):
        super().__init__()
        n = len(categories)
        if len(table) != n or any(len(row) != n for row in table):
            raise ValueError(f"table must be {n}x{n} for {n} categories")
        for i in range(n):
            for j in range(n):
                if abs(table[i][j] + table[j][i] - 1.0) > 1e-9:
                    raise ValueError(f"table[{i}][{j}] + table[{j}][{i}] must be 1 (P(a>b) + P(b>a))")
        self.categories, self.table = tuple(categories), tuple(tuple(r) for r in table)

    def category(self, reply: str) -> int | None:
        words = re.findall(r"[a-z]+", split_reply(reply)[0].lower())
        return next((self.categories.index(w) for w in words if w in self.categories), None)

    def _compare(self, triples):
        out = []
        for _, a, b in triples:
            i, j = self.category(a), self.category(b)
            out.append(0.5 if i is None and j is None else 0.0 if i is None else 1.0 if j is None
                       else self.table[i][j])
        return out
