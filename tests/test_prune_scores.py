"""Neuron scores and Top-v masks: magnitude, random, first-order movement, the straight-through
mask, local vs global ranking, and GUM's uniqueness penalty, on hand-built tensors."""

import pytest
import torch
from conftest import tiny_config

from minilm.model import Phi3
from minilm.prune.redundancy import NeuronMasker
from minilm.prune.scores import (magnitude_scores, masks_from_scores, movement_step, random_scores,
                                 straight_through, uniqueness_penalty)

pytestmark = pytest.mark.lesson_11


class HandMLP(torch.nn.Module):
    """An MLP-shaped holder of hand-set weights: 3 neurons, d_model 2."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(2, 6, bias=False)
        self.down_proj = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(torch.cat([torch.tensor(gate), torch.tensor(up)]))
            self.down_proj.weight.copy_(torch.tensor(down))


def test_magnitude_is_the_norm_of_gate_up_and_down_and_keeps_the_largest():
    mlp = HandMLP(gate=[[3., 0.], [0., 1.], [1., 1.]], up=[[0., 4.], [0., 0.], [1., 1.]],
                  down=[[0., 0., 1.], [0., 2., 1.]])
    scores = magnitude_scores(mlp)
    torch.testing.assert_close(scores, torch.tensor([5.0, 5.0 ** 0.5, 6.0 ** 0.5]))
    (mask,) = masks_from_scores([scores], density=2 / 3, global_rank=False)
    assert mask.tolist() == [1.0, 0.0, 1.0]   # the two largest norms, 5 and sqrt(6)


def test_global_ranking_gives_layers_different_densities_local_does_not():
    scores = [torch.tensor([10., 9., 8., 7.]), torch.tensor([1., 2., 3., 11.])]
    local = masks_from_scores(scores, 0.5, global_rank=False)
    assert [m.tolist() for m in local] == [[1, 1, 0, 0], [0, 0, 1, 1]]
    glob = masks_from_scores(scores, 0.5, global_rank=True)     # top 4 of all 8: 11, 10, 9, 8
    assert [m.tolist() for m in glob] == [[1, 1, 1, 0], [0, 0, 0, 1]]
    assert [m.mean().item() for m in glob] == [0.75, 0.25]
    # a layer that loses every neuron under the global threshold keeps its best one
    starved = masks_from_scores([torch.tensor([5., 6.]), torch.tensor([1., 2.])], 0.5, global_rank=True)
    assert [m.tolist() for m in starved] == [[1, 1], [0, 1]]


def test_masks_reject_a_density_outside_0_1():
    with pytest.raises(ValueError, match="density"):
        masks_from_scores([torch.ones(4)], 0.0, global_rank=False)


def test_random_scores_are_seeded_per_layer():
    assert torch.equal(random_scores(8, seed=3, layer=1), random_scores(8, seed=3, layer=1))
    assert not torch.equal(random_scores(8, seed=3, layer=1), random_scores(8, seed=3, layer=2))


def test_movement_step_is_minus_w_times_grad_summed_per_neuron():
    # 2 neurons, d_model 2: gate rows 0-1, up rows 2-3 of gate_up; down columns 0-1
    gu_w = torch.tensor([[1., 2.], [3., 4.], [5., 6.], [7., 8.]])
    gu_g = torch.tensor([[.5, -1.], [0., 1.], [1., 0.], [-1., 2.]])
    dn_w = torch.tensor([[1., -1.], [2., 0.]])
    dn_g = torch.tensor([[3., 1.], [-1., 5.]])
    # neuron 0: -(1*.5 + 2*-1) - (5*1 + 6*0) - (1*3 + 2*-1) = 1.5 - 5 - 1 = -4.5
    # neuron 1: -(3*0 + 4*1) - (7*-1 + 8*2) - (-1*1 + 0*5) = -4 - 9 + 1 = -12
    torch.testing.assert_close(movement_step(gu_w, gu_g, dn_w, dn_g), torch.tensor([-4.5, -12.0]))


def test_learned_score_gradient_is_first_order_movement_of_the_down_column():
    """At mask = 1 the straight-through score gradient dL/dS_j equals sum W_down[:, j] * dL/dW_down[:, j],
    so training scores with SGD accumulates exactly -sum W * dL/dW (the movement score)."""
    model = Phi3(tiny_config())
    masker = NeuronMasker(model)
    scores = [torch.zeros(96, requires_grad=True) for _ in range(2)]
    masker.masks = [straight_through(s, torch.ones(96)) for s in scores]
    x = torch.randint(0, 320, (2, 10))
    model(x, x.roll(-1, 1))[1].backward()
    for s, layer in zip(scores, model.model.layers):
        w, g = layer.mlp.down_proj.weight, layer.mlp.down_proj.weight.grad
        zeros = torch.zeros_like(layer.mlp.gate_up_proj.weight)
        torch.testing.assert_close(-s.grad, movement_step(zeros, zeros, w, g), rtol=1e-4, atol=1e-7)


def test_straight_through_is_the_hard_mask_forward_and_identity_backward():
    s = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    hard = torch.tensor([1.0, 0.0, 1.0])
    m = straight_through(s, hard)
    assert torch.equal(m, hard)
    (m * torch.tensor([2.0, 3.0, 4.0])).sum().backward()
    assert s.grad.tolist() == [2.0, 3.0, 4.0]


def test_uniqueness_penalty_is_1_for_duplicates_and_0_for_orthogonal_neurons():
    a = torch.tensor([[1., 0.], [0., 1.], [0., 0.]])                   # (N=3 tokens, F=2)
    assert uniqueness_penalty(a, torch.ones(2)).item() == pytest.approx(0.0)
    dup = torch.tensor([[1., 2.], [2., 4.], [-1., -2.]])
    assert uniqueness_penalty(dup, torch.ones(2)).item() == pytest.approx(1.0, abs=1e-6)
    # a pruned partner does not count, and a pruned neuron adds nothing
    three = torch.cat([dup, torch.tensor([[0.], [0.], [5.]])], dim=1)   # neuron 2 orthogonal-ish
    assert uniqueness_penalty(three, torch.tensor([1., 0., 1.])).item() < 0.5


def test_uniqueness_penalty_takes_each_neurons_nearest_partner_not_the_average():
    # columns a, b duplicate each other and c is orthogonal to both: nearest |cos| 1, 1, 0
    acts = torch.tensor([[1., 2., 0.], [0., 0., 1.], [0., 0., 0.]])
    assert uniqueness_penalty(acts, torch.ones(3)).item() == pytest.approx(2 / 3)   # the mean form gives 1/3
