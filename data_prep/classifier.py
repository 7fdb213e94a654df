"""Educational-value classifier: annotate a sample, train a cheap model, score the pool (lesson 05).

    from data_prep.classifier import RubricAnnotator, train_classifier, score_pool, keep_top
    sample = docs[:500]
    model = train_classifier(sample, [RubricAnnotator().annotate(d) for d in sample])
    scores = score_pool(docs, model)
    kept = keep_top(docs, scores, fraction=0.3)

The phi-1 idea (arXiv 2306.11644, section 2.1; reused by Phi-3 for its web filter): an expensive
annotator (GPT-4) labels ~100k samples for "educational value for a student learning the subject";
a cheap classifier trained on embeddings of those samples then scores the whole pool, and a
threshold keeps the best. Three pluggable parts, in reading order:

1. Annotator: anything with `annotate(doc) -> float in [0, 1]`. `RubricAnnotator` is additive
   points in the spirit of the FineWeb-Edu prompt, each point a small rule. `SourcePriorAnnotator`
   is the GPT-3 quality-filter idea (reference corpus = 1, raw pool = 0).
2. Embedding: `hashed_features` (word uni+bigrams hashed into 2^18 dims, sublinear tf, l2-norm).
3. Classifier: logistic regression on those features, SGD in numpy, soft targets (the score).

Deviations from the papers, stated honestly: the rubric is a RULE-BASED STAND-IN for phi-1's
GPT-4 annotator, so it rewards the surface of explanatory prose (definition phrases, examples,
sentence shape), not real understanding; the classifier is logistic regression on hashed n-grams,
not a random forest on a pretrained model's output embeddings (the `embed` hook is where minilm's
mean-pooled hidden states would go); and our pool is hundreds of documents, not billions.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from data_prep.document import Document

N_FEATURES = 2 ** 18
EDU_THRESHOLD = 3.5 / 6    # "educational" = at least 4 of the 6 rubric points
WORD = re.compile(r"[a-z0-9_]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# 1. annotators.


class Annotator(Protocol):
    def annotate(self, doc: Document) -> float: ...


DEFINITION = re.compile(r"\b(is an?|are|means|refers to|because|is used to|so that|which)\b", re.I)
EXAMPLE = re.compile(r"(for example|for instance|e\.g\.|such as|>>>|example:|consider)", re.I)
BOILERPLATE = re.compile(r"(copyright|licen[cs]e|warranty|all rights reserved|upstream-name|"
                         r"changelog|signed-off-by|^\s*\*\s|^ -- .*<.*@.*>|\b\d{4}-\d{2}-\d{2}\b)",
                         re.I | re.M)
OPTION_LINE = re.compile(r"^\s*(-{1,2}[A-Za-z]|\*|\+|[0-9]+\.)\S*")


def _sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(" ".join(text.split())) if len(s.split()) >= 3]


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def point_explains(text: str) -> bool:
    """Explanatory prose: 2+ sentences that define or justify ("is a", "means", "because")."""
    return sum(bool(DEFINITION.search(s)) for s in _sentences(text)) >= 2


def point_example(text: str) -> bool:
    """Introduces a concept WITH an example: a definition phrase and an example marker."""
    return bool(DEFINITION.search(text)) and bool(EXAMPLE.search(text))


def point_coherent(text: str) -> bool:
    """Coherent paragraphs: mean sentence 6-40 words, and at least 60% of lines are mostly letters
    (code, tables and symbol lines are few)."""
    sents, lines = _sentences(text), _lines(text)
    if not sents or not lines:
        return False
    mean_len = sum(len(s.split()) for s in sents) / len(sents)
    prose = sum(sum(c.isalpha() or c == " " for c in ln) >= 0.8 * len(ln) for ln in lines)
    return 6 <= mean_len <= 40 and prose >= 0.6 * len(lines)


def point_no_boilerplate(text: str) -> bool:
    """No licence, copyright, changelog or packaging markers (at most one stray match)."""
    return len(BOILERPLATE.findall(text)) <= 1


def point_not_a_list(text: str) -> bool:
    """Not just a list of flags/bullets: under 40% of lines start with -x, --x, *, + or "1."."""
    lines = _lines(text)
    return bool(lines) and sum(bool(OPTION_LINE.match(ln)) for ln in lines) < 0.4 * len(lines)


def point_substantive(text: str) -> bool:
    """Long enough to teach something: at least 40 words."""
    return len(text.split()) >= 40


RUBRIC: list[Callable[[str], bool]] = [point_explains, point_example, point_coherent,
                                       point_no_boilerplate, point_not_a_list, point_substantive]


class RubricAnnotator:
    """Additive rubric (FineWeb-Edu style): one point per rule in `RUBRIC`, score = points / 6.

    A rule-based stand-in for phi-1's GPT-4 annotator. Only the first `max_chars` characters are
    read, like an LLM annotator that sees a truncated sample."""

    def __init__(self, rubric: list[Callable[[str], bool]] | None = None, max_chars: int = 4000):
        self.rubric, self.max_chars = rubric or RUBRIC, max_chars

    def points(self, doc: Document) -> dict[str, bool]:
        text = doc.text[: self.max_chars]
        return {f.__name__: bool(f(text)) for f in self.rubric}

    def annotate(self, doc: Document) -> float:
        return sum(self.points(doc).values()) / len(self.rubric)


@dataclass
class SourcePriorAnnotator:
    """GPT-3 quality-filter style: 1.0 for a reference corpus (here stdlib docstrings and synthetic
    textbook text), 0.0 for the raw pool (doc, pypi, man). Learns "looks like the reference"."""
    positive: tuple[str, ...] = ("stdlib", "synthetic")

    def annotate(self, doc: Document) -> float:
        return 1.0 if doc.source in self.positive else 0.0


# 2. embeddings.

Features = tuple[np.ndarray, np.ndarray]   # (indices int64 [k], values float32 [k]), sparse


def hashed_features(text: str, n_features: int = N_FEATURES) -> Features:
    """Word unigrams + bigrams hashed (crc32, deterministic across runs, unlike `hash`) into
    `n_features` buckets; sublinear tf (1 + log tf); l2-normalised. The "cheap embedding"."""
    words = WORD.findall(text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    counts: dict[int, int] = {}
    for g in grams:
        h = zlib.crc32(g.encode()) % n_features
        counts[h] = counts.get(h, 0) + 1
    idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    val = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
    norm = float(np.sqrt((val ** 2).sum())) or 1.0
    return idx, (val / norm).astype(np.float32)


# A hook for later: `embed(text) -> Features`. For a dense vector v (say minilm's mean-pooled hidden
# states) return (np.arange(len(v)), v) and build the classifier with n_features=len(v).
Embed = Callable[[str], Features]

# 3. classifier.


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0)))


class Classifier:
    """Logistic regression on sparse features: p = sigmoid(w . x + b), trained with per-document
    SGD on binary cross-entropy against soft targets in [0, 1] (the annotator's score)."""

    def __init__(self, n_features: int = N_FEATURES, embed: Embed | None = None, max_chars=4000):
        self.n_features, self.max_chars = n_features, max_chars
        self.embed = embed or (lambda t: hashed_features(t, n_features))
        self.w = np.zeros(n_features, dtype=np.float32)
        self.b = 0.0

    def features(self, doc: Document) -> Features:
        return self.embed(doc.text[: self.max_chars])

    def predict_features(self, feats: list[Features]) -> list[float]:
        return [sigmoid(float(self.w[i] @ v) + self.b) for i, v in feats]

    def fit_features(self, feats: list[Features], targets: list[float], epochs: int = 30,
                     lr: float = 0.5, l2: float = 1e-4, seed: int = 0) -> list[float]:
        """SGD over shuffled documents; returns the mean loss of each epoch (should fall)."""
        rng, losses = np.random.default_rng(seed), []
        for _ in range(epochs):
            total = 0.0
            for j in rng.permutation(len(feats)):
                (i, v), y = feats[j], targets[j]
                p = sigmoid(float(self.w[i] @ v) + self.b)
                total -= y * math.log(p + 1e-9) + (1 - y) * math.log(1 - p + 1e-9)
                g = p - y                                    # dBCE/dlogit
                self.w[i] -= lr * (g * v + l2 * self.w[i])   # only touched weights decay (lazy L2)
                self.b -= lr * g
            losses.append(total / len(feats))
        return losses

    def fit(self, docs: list[Document], targets: list[float], **kw) -> list[float]:
        return self.fit_features([self.features(d) for d in docs], targets, **kw)

    def predict(self, docs: list[Document]) -> list[float]:
        return self.predict_features([self.features(d) for d in docs])

    def save(self, path: str | Path) -> None:
        """npz with the weights and a json header (n_features, max_chars). Hashed embedding only."""
        np.savez_compressed(path, w=self.w, b=np.float64(self.b), header=json.dumps(
            {"n_features": self.n_features, "max_chars": self.max_chars}))

    @classmethod
    def load(cls, path: str | Path, embed: Embed | None = None) -> "Classifier":
        z = np.load(path)
        h = json.loads(str(z["header"]))
        model = cls(h["n_features"], embed=embed, max_chars=h["max_chars"])
        model.w, model.b = z["w"].astype(np.float32), float(z["b"])
        return model


def train_classifier(docs: list[Document], targets: list[float], **kw) -> Classifier:
    model = Classifier()
    model.fit(docs, targets, **kw)
    return model

# 4. scoring the pool, keeping the best, measuring.


def score_pool(docs: list[Document], model: Classifier) -> list[float]:
    """The classifier's educational-value score for every document (cheap: one sparse dot each)."""
    return model.predict(docs)


def score_threshold(scores, threshold: float | None = None, fraction: float | None = None) -> float:
    """`threshold` itself, or the score of the `fraction`-th best document (exactly one given).
    Needs only the scores (8 bytes per document as a float64 array), not the documents."""
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold or fraction")
    if fraction is None:
        return threshold
    k = max(0, min(len(scores), round(fraction * len(scores))))
    return float(np.sort(np.asarray(scores, dtype=np.float64))[::-1][k - 1]) if k else math.inf


def keep_top(docs: list[Document], scores: list[float], threshold: float | None = None,
             fraction: float | None = None) -> list[Document]:
    """Keep documents scoring >= `threshold`, or the best `fraction` of them (exactly one given).
    Each kept document's score goes into `meta["edu_score"]`; pool order is preserved."""
    threshold = score_threshold(scores, threshold, fraction)
    return [Document(d.id, d.source, d.text, {**d.meta, "edu_score": s})
            for d, s in zip(docs, scores) if s >= threshold]


def evaluate(pred: list[float], labels: list[float],
             threshold: float = EDU_THRESHOLD) -> dict[str, float]:
    """Precision, recall and F1 of "pred >= threshold" against "label >= threshold"."""
    p = np.asarray(pred) >= threshold
    t = np.asarray(labels) >= threshold
    tp = int((p & t).sum())
    precision = tp / max(int(p.sum()), 1)
    recall = tp / max(int(t.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n": len(pred),
            "positives": int(t.sum())}
