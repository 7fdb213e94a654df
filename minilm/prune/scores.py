"""Importance scores for FFN neurons, and the Top-v masks they select (lesson 11).

    from minilm.prune.scores import magnitude_scores, masks_from_scores
    scores = [magnitude_scores(layer.mlp) for layer in model.model.layers]   # one (d_ff,) per layer
    masks = masks_from_scores(scores, density=0.5, global_rank=True)        # one 0/1 (d_ff,) per layer

A neuron j of a layer is row j of the gate half and row j of the up half of
`mlp.gate_up_proj.weight` (2*d_ff, d_model) and column j of `mlp.down_proj.weight` (d_model, d_ff);
removing it removes all three, so the pruned model is a smaller dense model. Methods, following
Santacroce, Wen, Shen, Li 2023, "What Matters In The Structured Pruning of Generative Language
Models?" (arXiv 2302.03773):

  magnitude   ||(gate_j, up_j, down_j)||_2 of the current weights: keep the largest
  random      seeded uniform scores (fixed for the run, so masks are nested as density falls)
  movement    a learned score per neuron (Lagunas et al. 2021, arXiv 2109.04838), trained by the
              task loss through a straight-through Top-v mask (`straight_through`); its gradient
              at mask = 1 is the first-order movement -sum W * dL/dW (`movement_step`)
  gum         Globally Unique Movement: the learned scores, Top-v taken GLOBALLY over all layers,
              plus a cosine-similarity regulariser for unique kept neurons (`uniqueness_penalty`)

Deviation: the paper's exact GUM regulariser and its weight are not reproduced; `uniqueness_penalty`
is our formulation ("penalise kept neurons whose activations are nearly parallel to another kept
neuron's") and PruneConfig.gum_weight is our choice (lesson 11, "What we could check in the paper").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neuron_slices(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (F, D), up (F, D), down (D, F)) views of one MLP's weights; neuron j = gate[j], up[j], down[:, j]."""
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
    return gate, up, mlp.down_proj.weight


def magnitude_scores(mlp) -> torch.Tensor:
    """(F,) L2 norm of each neuron's weights (gate row, up row, down column together)."""
    gate, up, down = (w.detach().float() for w in neuron_slices(mlp))
    return (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()


def random_scores(n_neurons: int, seed: int, layer: int) -> torch.Tensor:
    """(F,) uniform scores from a generator seeded by (seed, layer): the same on every call."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)   # a distinct stream per (seed, layer)
    return torch.rand(n_neurons, generator=g)


def movement_step(gate_up_w: torch.Tensor, gate_up_grad: torch.Tensor,
                  down_w: torch.Tensor, down_grad: torch.Tensor) -> torch.Tensor:
    """(F,) one step of first-order movement: -sum of W * dL/dW over each neuron's weights.

    gate_up_* are (2F, D) (rows: gate then up), down_* are (D, F). Summed over the steps of
    fine-tuning this is Sanh et al. 2020's score S = -sum_t W * dL/dW, grouped by neuron: it grows
    when gradient descent pushes a weight away from zero.
    """
    prod = -(gate_up_w * gate_up_grad).float()          # (2F, D)
    gate, up = prod.chunk(2, dim=0)                     # (F, D) each
    return gate.sum(1) + up.sum(1) - (down_w * down_grad).float().sum(0)   # rows of gate/up, columns of down


def straight_through(scores: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The 0/1 `hard` mask in the forward pass, with the gradient passed straight to `scores`.

    dL/dscores = dL/dmask: the straight-through estimator of Bengio et al. 2013 that movement
    pruning (Sanh et al. 2020; Lagunas et al. 2021) uses to train scores through Top-v.
    """
    return hard + (scores - scores.detach())   # exactly `hard` in value: s - s is 0.0


def _keep_counts(sizes: list[int], density: float) -> list[int]:
    return [max(1, round(density * n)) for n in sizes]


def masks_from_scores(scores: list[torch.Tensor], density: float, global_rank: bool) -> list[torch.Tensor]:
    """0/1 float masks keeping the top-scoring neurons: `density` of each layer (local) or of all.

    Local: each layer keeps round(density * F_l) neurons. Global: one threshold over every
    layer's scores, keeping round(density * sum F_l) neurons in all, so layers end at different
    densities. Either way every layer keeps at least one neuron (a layer of width 0 is not a
    model we can compact or export); ties go to the lower index.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}; sparsity 0.5 is density 0.5")
    if not scores:
        raise ValueError("masks_from_scores needs at least one layer's scores")
    scores = [s.detach().float().flatten() for s in scores]
    sizes = [s.numel() for s in scores]
    if not global_rank:
        return [_top_mask(s, k) for s, k in zip(scores, _keep_counts(sizes, density))]
    flat = torch.cat(scores)                            # (sum F_l,): one ranking over every layer
    keep = _top_mask(flat, max(1, round(density * flat.numel())))
    masks = list(keep.split(sizes))                     # back to one (F_l,) mask per layer
    for i, (m, s) in enumerate(zip(masks, scores)):
        if m.sum() == 0:  # global ranking emptied this layer: keep its best neuron
            masks[i] = _top_mask(s, 1)
    return masks


def _top_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-s, stable=True).indices     # descending, ties by index
    mask = torch.zeros_like(s)
    mask[order[:k]] = 1.0
    return mask


def uniqueness_penalty(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GUM's regulariser (our formulation): mean over kept neurons of max |cos| to another kept one.

    acts (N, F): one layer's FFN activations silu(gate) * up on N tokens; mask (F,): the
    straight-through mask (hard 0/1 values, gradient to the scores). Differentiable in both: the
    gradient lowers the scores of redundant neurons (selection accounts for uniqueness) and
    pushes the kept neurons' activations apart. 0 for two orthogonal neurons, 1 for duplicates.
    """
    a = F.normalize(acts.float(), dim=0)                           # unit columns (N, F)
    sim = (a.T @ a).abs()                                          # (F, F) |cosine|
    partner = mask.detach() * (1 - torch.eye(sim.shape[0], device=sim.device))  # kept others only
    nearest = (sim * partner).max(dim=1).values                    # (F,)
    return (mask * nearest).sum() / mask.detach().sum().clamp(min=1)
