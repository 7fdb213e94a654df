"""The pipeline's optional model paths (data_prep/with_model.py) and its worker processes.

    pytest -m lesson_05 tests/test_with_model.py
"""

import math

import pytest
import torch
from conftest import tiny_config

from data_prep import pipeline
from data_prep.dedup import deduplicate
from data_prep.document import Document
from data_prep.filters import apply_filters
from data_prep.parallel import parallel_map
from data_prep.sources import iter_documents
from data_prep.with_model import JudgeAnnotator, PerplexityAnnotator, mean_nll, model_passages, rank_scores
from minilm import MinilmError
from minilm.model import Phi3
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_05


@pytest.fixture(scope="module")
def tok(data_dir):
    return Tokenizer.load(data_dir)


def test_workers_give_the_same_result_as_one_process():
    docs = list(iter_documents(["stdlib"], 150))
    docs += [Document(f"copy/{i}", "stdlib", d.text) for i, d in enumerate(docs[:10])]  # exact dups
    one, two = apply_filters(docs, workers=1), apply_filters(docs, workers=2)
    assert [d.id for d in one.kept] == [d.id for d in two.kept]
    assert one.counts == two.counts and sum(one.counts.values()) > 0
    d1, d2 = deduplicate(one.kept, workers=1), deduplicate(one.kept, workers=2)
    assert [d.id for d in d1.kept] == [d.id for d in d2.kept] and d1.counts == d2.counts
    assert d1.counts["exact"] >= 1


def test_parallel_map_keeps_order_and_rejects_bad_workers():
    items = list(range(200))
    assert parallel_map(math.factorial, items, workers=2, progress=False) == [math.factorial(i) for i in items]
    with pytest.raises(ValueError, match="workers"):
        parallel_map(abs, items, workers=0)


def test_unknown_annotator_is_a_clear_error():
    with pytest.raises(MinilmError, match="unknown annotator 'gpt4'"):
        pipeline.make_annotator("gpt4")
    with pytest.raises(MinilmError, match="not a minilm checkpoint"):
        pipeline.make_annotator("perplexity:/nonexistent/checkpoint")


def test_rank_scores_by_hand():
    assert rank_scores([3.0, 1.0, 2.0]) == [0.0, 1.0, 0.5]             # lowest NLL is best
    assert rank_scores([3.0, 1.0, 2.0], higher_is_better=True) == [1.0, 0.0, 0.5]
    assert rank_scores([1.0, 1.0, 5.0]) == [0.75, 0.75, 0.0]           # ties share their mean rank
    assert rank_scores([7.0]) == [1.0]


def test_mean_nll_equals_the_model_loss(tok):
    model = Phi3(tiny_config())
    texts = ["The quick brown fox jumps over the lazy dog.", "Return the value of x."]
    got = mean_nll(model, tok, texts, batch_size=2)                      # left-padded batch of two
    for text, nll in zip(texts, got):
        ids = torch.tensor([[tok.eot_id] + tok.encode(text)])
        assert nll == pytest.approx(model(ids[:, :-1], ids[:, 1:])[1].item(), abs=1e-5)  # both in fp32


def test_perplexity_annotator_prefers_text_like_its_training_data(tok):
    torch.manual_seed(0)
    model = Phi3(tiny_config())
    reference = "A list is an ordered collection. For example, a list can hold numbers or words. " * 3
    ids = torch.tensor([[tok.eot_id] + tok.encode(reference)])[:, :64]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    docs = [Document("noise", "x", "zq xv 9;{ ]]k wq pp ||x 0x7f ~~ qz"), Document("ref", "x", reference)]
    assert PerplexityAnnotator(model, tok).annotate_batch(docs) == [0.0, 1.0]


def test_judge_is_p_yes_over_yes_or_no(tok):
    model = Phi3(tiny_config(max_seq_len=256))
    judge = JudgeAnnotator(model, tok, max_tokens=20)
    doc = Document("d", "x", "Lists hold items in order.")
    prompt = judge.prompt(doc)
    assert prompt[0] == tok.special_id("<|user|>") and tok.special_id("<|assistant|>") in prompt[-3:]
    logits = model(torch.tensor([prompt]))[0][0, -1]
    yes, no = logits[tok.encode("Yes")[0]], logits[tok.encode("No")[0]]
    assert judge.annotate(doc) == pytest.approx(torch.sigmoid(yes - no).item(), abs=1e-6)
    with pytest.raises(ValueError, match="question alone"):
        JudgeAnnotator(Phi3(tiny_config(max_seq_len=16)), tok).prompt(doc)


def test_model_passages(tok):
    model = Phi3(tiny_config())
    docs = list(model_passages(model, tok, ["loops", "fractions"], per_topic=3, max_new_tokens=8))
    assert len(docs) == 6 and {d.source for d in docs} == {"synthetic_model"}
    assert docs[0].text.startswith("# loops\n\n") and docs[-1].meta == {"topic": "fractions"}
    assert len({d.id for d in docs}) == 6
