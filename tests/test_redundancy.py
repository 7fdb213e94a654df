"""Redundancy measures: duplicated neurons are fully redundant, orthogonal ones not at all, pruned
neurons do not count; on a model with duplicated FFN neurons the layer's redundancy is 1."""

import math

import pytest
import torch
from conftest import tiny_config

from minilm.model import Phi3
from minilm.prune.redundancy import max_cosine_similarity, neuron_sensitivity, redundancy_report

pytestmark = pytest.mark.lesson_11


def test_max_cosine_of_duplicated_and_orthogonal_neurons():
    acts = torch.tensor([[1., 2., 0.], [2., 4., 0.], [0., 0., 3.]])      # neurons 0 and 1 parallel
    torch.testing.assert_close(max_cosine_similarity(acts), torch.tensor([1.0, 1.0, 0.0]))
    pruned = max_cosine_similarity(acts, keep=torch.tensor([1., 0., 1.]))  # 0's twin is pruned
    assert pruned[0].item() == pytest.approx(0.0) and math.isnan(pruned[1].item())


def test_sensitivity_is_abs_sum_of_activation_times_gradient():
    acts = torch.tensor([[1., 2.], [3., -1.]])
    grads = torch.tensor([[0.5, 1.], [-1., 2.]])
    assert neuron_sensitivity(acts, grads).tolist() == [2.5, 0.0]        # |.5 - 3|, |2 - 2|


def test_a_layer_of_duplicated_neurons_has_redundancy_1():
    model = Phi3(tiny_config())
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        gate[1::2] = gate[0::2]                                          # neuron 2k+1 = neuron 2k
        up[1::2] = up[0::2]
    x = torch.randint(0, 320, (2, 12))
    batch = {"tokens": x, "targets": x.roll(-1, 1), "attention_mask": torch.ones_like(x)}
    report = redundancy_report(model, batch)
    assert report["redundancy"][0] == pytest.approx(1.0, abs=1e-5)
    assert report["redundancy"][1] < 0.99 and report["density"] == [1.0, 1.0]
    # keeping one of each pair removes the duplication
    keep = torch.tensor([1.0, 0.0] * 48)
    after = redundancy_report(model, batch, [keep, None])
    assert after["redundancy"][0] < 0.99 and after["density"][0] == 0.5
    assert all(p.grad is None for p in model.parameters())              # the probe leaves no grads
