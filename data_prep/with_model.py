"""The pipeline's optional paths that use a trained minilm model: two annotators and a passage writer.

    from data_prep.with_model import PerplexityAnnotator, JudgeAnnotator, make_annotator, model_passages
    ck = load_checkpoint("runs/tiny/checkpoint")
    scores = PerplexityAnnotator(ck.model, ck.tokenizer).annotate_batch(docs)     # [0, 1], 1 = best
    docs = list(model_passages(ck.model, ck.tokenizer, ["recursion", "the shell"], per_topic=4))

`python -m data_prep.pipeline --annotator perplexity:runs/tiny/checkpoint` plugs the first into
the pipeline's classifier step in place of the rubric; `make_annotator(spec)` reads such a spec.

1. `JudgeAnnotator` is phi-1's annotator (arXiv 2306.11644, section 2.1) with a minilm model in
   GPT-4's seat: the document goes into a Phi-3 chat prompt asking whether it has educational value
   for a student, and the score is P("Yes") / (P("Yes") + P("No")) for the first reply token. It
   needs a model that follows instructions (an SFT checkpoint, or a real Phi-3 brought in with
   `minilm import-hf` together with a matching tokenizer); a 1M-parameter laptop model answers
   close to chance, which is why it is not the default.
2. `PerplexityAnnotator` is the judge that does work at laptop scale: CCNet (Wenzek et al. 2019)
   kept web text that a language model trained on Wikipedia found likely. Here the model is a
   minilm checkpoint trained on a reference corpus (say phase 2: the best real text plus the
   synthetic textbooks); each document's mean negative log-likelihood over its first `max_tokens`
   tokens is turned into a rank score (lowest NLL -> 1), so no threshold needs calibrating.
3. `model_passages` is phi-1's synthetic "textbook" path at our scale: a trained model writes a
   passage from each topic seed. Unlike `data_prep/synthetic.py`, nothing checks what it writes;
   the passages are only as correct as the model, so they are an optional extra, tagged with
   source "synthetic_model" so the manifest counts them apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from data_prep.classifier import RubricAnnotator, SourcePriorAnnotator
from data_prep.document import Document
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.generate import generate, left_pad

# Seeds for `model_passages`: the subjects our real and synthetic text teaches.
TOPIC_SEEDS = ("fractions", "percentages", "prime numbers", "averages", "rates", "unit conversion",
               "variables", "loops", "functions", "lists", "dictionaries", "strings", "recursion",
               "sorting", "files and directories", "the shell", "regular expressions", "processes",
               "networking", "compression", "dates and times", "text encodings", "testing", "errors")

JUDGE_QUESTION = ("Does the following text have educational value for a student learning the "
                  "subject? Answer Yes or No.\n\n")


def _ids(tokenizer, text: str, limit: int) -> list[int]:
    """Ordinary text as token ids (special-token strings inside it stay plain text), cut to `limit`."""
    return tokenizer.encode(text)[:limit] or [tokenizer.eot_id]


@torch.no_grad()
def mean_nll(model, tokenizer, texts: list[str], max_tokens: int = 256, batch_size: int = 8) -> list[float]:
    """Mean next-token negative log-likelihood (nats) of each text's first `max_tokens` tokens."""
    device = next(model.parameters()).device
    max_tokens = min(max_tokens, model.config.max_seq_len - 1)
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        # <|endoftext|> first, so the first real token is predicted too (as during pretraining)
        rows = [[tokenizer.eot_id] + _ids(tokenizer, t, max_tokens) for t in texts[i:i + batch_size]]
        tokens, mask = left_pad(rows, tokenizer.eot_id, device)          # (B, T), left-padded
        logits, _ = model(tokens, attention_mask=mask)
        logp = torch.log_softmax(logits[:, :-1].float(), -1)             # predicts tokens[:, 1:]
        nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)          # (B, T-1)
        target_mask = mask[:, 1:] * mask[:, :-1]                         # a real token after a real one
        out += ((nll * target_mask).sum(1) / target_mask.sum(1)).tolist()
    return out


def rank_scores(values: list[float], higher_is_better: bool = False) -> list[float]:
    """Each value's rank as a score in [0, 1]: 1 for the best, 0 for the worst, ties averaged."""
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i], reverse=higher_is_better)  # best first
    scores = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            scores[order[k]] = 1.0 - ((i + j) / 2) / (n - 1)
        i = j + 1
    return scores


class PerplexityAnnotator:
    """CCNet-style quality judge: likelier under a reference-trained model = more educational."""

    def __init__(self, model, tokenizer, max_tokens: int = 256, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def annotate_batch(self, docs: list[Document]) -> list[float]:
        return rank_scores(mean_nll(self.model, self.tokenizer, [d.text for d in docs],
                                    self.max_tokens, self.batch_size))

    def annotate(self, doc: Document) -> float:
        raise TypeError("PerplexityAnnotator scores by rank within a sample; call annotate_batch(docs)")


class JudgeAnnotator:
    """phi-1's LLM annotator with a minilm chat model as the judge: P(Yes) for each document."""

    def __init__(self, model, tokenizer, max_tokens: int = 192, yes: str = "Yes", no: str = "No"):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.yes, self.no = tokenizer.encode(yes)[0], tokenizer.encode(no)[0]
        if self.yes == self.no:
            raise ValueError(f"{yes!r} and {no!r} start with the same token; pick distinct answers")

    def prompt(self, doc: Document) -> list[int]:
        """<|user|>\n{question}{document}<|end|>\n<|assistant|>\n as ids (Phi-3's chat format).

        The document is cut so that the whole prompt fits the model's context."""
        t = self.tokenizer
        head = [t.special_id("<|user|>")] + t.encode("\n" + JUDGE_QUESTION)
        tail = [t.special_id("<|end|>")] + t.encode("\n") + [t.special_id("<|assistant|>")] + t.encode("\n")
        room = min(self.max_tokens, self.model.config.max_seq_len - len(head) - len(tail))
        if room < 1:
            raise ValueError(f"the judge's question alone takes {len(head) + len(tail)} tokens, more than "
                             f"the model's context of {self.model.config.max_seq_len}")
        return head + _ids(t, doc.text, room) + tail

    @torch.no_grad()
    def annotate(self, doc: Document) -> float:
        ids = torch.tensor([self.prompt(doc)], device=next(self.model.parameters()).device)
        self.model.eval()
        logits = self.model(ids)[0][0, -1].float()                    # (V,) the first reply token
        pair = torch.log_softmax(logits, -1)[[self.yes, self.no]]
        return torch.softmax(pair, 0)[0].item()                        # P(Yes | Yes or No)

    def annotate_batch(self, docs: list[Document]) -> list[float]:
        return [self.annotate(d) for d in docs]


@torch.no_grad()
def model_passages(model, tokenizer, topics: Iterable[str], per_topic: int = 2, max_new_tokens: int = 160,
                   temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> Iterator[Document]:
    """Passages a trained model writes from topic seeds ("# {topic}\\n\\n"), as Documents."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    budget = model.config.max_seq_len
    for topic in topics:
        head = f"# {topic}\n\n"
        prompt = [tokenizer.eot_id] + tokenizer.encode(head)
        rollout = generate(model, [prompt] * per_topic, min(max_new_tokens, budget - len(prompt)),
                           temperature=temperature, top_p=top_p, stop_tokens=[tokenizer.eot_id],
                           pad_id=tokenizer.eot_id, generator=g)
        for k, ids in enumerate(rollout.responses(strip=(tokenizer.eot_id,))):
            yield Document(f"synthetic_model/{topic}/{seed}-{k}", "synthetic_model",
                           head + tokenizer.decode(ids), {"topic": topic})


def load_model(path: str):
    """A checkpoint that has a tokenizer (a model annotator or writer needs one)."""
    ck = load_checkpoint(path)
    if ck.tokenizer is None:
        raise MinilmError(f"{path} has no tokenizer; a model annotator or writer needs one")
    return ck


def make_annotator(spec: str):
    """`rubric`, `source`, `perplexity:CHECKPOINT` or `judge:CHECKPOINT` -> an annotator object."""
    kind, _, path = spec.partition(":")
    if kind == "rubric" and not path:
        return RubricAnnotator()
    if kind == "source" and not path:
        return SourcePriorAnnotator()
    if kind in ("perplexity", "judge") and path:
        ck = load_model(path)
        return (PerplexityAnnotator if kind == "perplexity" else JudgeAnnotator)(ck.model, ck.tokenizer)
    raise MinilmError(f"unknown annotator {spec!r}; use rubric, source, perplexity:CHECKPOINT_DIR "
                      f"or judge:CHECKPOINT_DIR")
