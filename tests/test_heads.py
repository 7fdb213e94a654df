"""Hydra heads: one trunk pass gives the LM logits and scalar head values (lesson 07)."""

import pytest
import torch
from conftest import tiny_config

from minilm.model import Phi3
from minilm.post.heads import HydraModel, last_token_index

pytestmark = pytest.mark.lesson_07


@pytest.fixture
def hydra():
    torch.manual_seed(0)
    model = HydraModel(Phi3(tiny_config()), heads=("reward", "value")).eval()
    with torch.no_grad():  # non-trivial head weights so values differ between positions and heads
        for head in model.heads.values():
            head.weight.normal_(std=0.5)
            head.bias.fill_(0.1)
    return model


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 2]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_forward_equals_lm_and_hand_built_heads(hydra):
    idx = torch.randint(0, 320, (3, 10))
    targets = torch.randint(0, 320, (3, 10))
    logits, loss, values = hydra(idx, targets=targets)
    ref_logits, ref_loss = hydra.lm(idx, targets)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    hidden = hydra.lm.hidden(idx)
    for name in ("reward", "value"):
        head = hydra.heads[name]
        torch.testing.assert_close(values[name], hidden @ head.weight[0] + head.bias[0])
    assert values["reward"].shape == (3, 10) and not torch.allclose(values["reward"], values["value"])


def test_one_trunk_pass_serves_every_head(hydra):
    calls = []
    hook = hydra.lm.model.register_forward_hook(lambda *a: calls.append(1))
    hydra(torch.randint(0, 320, (2, 6)))
    hook.remove()
    assert len(calls) == 1


def test_score_reads_the_last_real_token_and_ignores_padding(hydra):
    seq = [5, 6, 7, 8, 9]
    alone = hydra.score(torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long))
    right = hydra.score(torch.tensor([seq + [0, 0]]), torch.tensor([[1] * 5 + [0, 0]]))
    left = hydra.score(torch.tensor([[0, 0] + seq]), torch.tensor([[0, 0] + [1] * 5]))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    values = hydra(torch.tensor([seq]))[2]["reward"]
    torch.testing.assert_close(alone, values[:, -1])
    assert not torch.allclose(alone, values[:, -2])
    with pytest.raises(ValueError, match="no head"):
        hydra.score(torch.tensor([seq]), head="critic")


def test_fresh_heads_start_near_zero():
    torch.manual_seed(0)
    model = HydraModel(Phi3(tiny_config()))
    scores = model.score(torch.randint(0, 320, (8, 12)))
    assert list(model.heads) == ["reward"] and scores.abs().max() < 0.2
