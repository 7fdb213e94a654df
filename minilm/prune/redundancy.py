"""Neuron-level redundancy of a (pruned) FFN: uniqueness and sensitivity per layer (lesson 11).

    from minilm.prune.redundancy import redundancy_report
    report = redundancy_report(model, batch, masks)     # masks: list of (d_ff,) 0/1, or None = dense
    report["redundancy"], report["sensitivity"]          # one float per layer

Santacroce et al. 2023 (arXiv 2302.03773) explain why random pruning nearly matches movement by
two neuron-level views of the kept neurons: how *sensitive* the loss is to each one, and how
*unique* each one is compared with the others. We measure, on a fixed probe batch:

  redundancy   mean over kept neurons of the max |cosine similarity| between the neuron's
               activation vector (silu(gate) * up over the probe tokens) and another kept
               neuron's. 1: every kept neuron has an exact (or sign-flipped) duplicate, which the
               down projection could absorb; near 0: all directions distinct. We take |cos|
               because down_proj can absorb a sign.
  sensitivity  mean over kept neurons of |sum_t h_tj * dL/dh_tj|, the first-order change of the
               loss if neuron j were removed (Taylor / the gradient of the mask; Molchanov et al.
               2017, arXiv 1611.06440). Large: the loss depends on the neuron.

Deviation: these are our readings of the paper's "uniqueness" and "sensitivity" (its exact
definitions and aggregation are not reproduced), so the numbers compare our methods with each
other, not with the paper's tables (lesson 11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minilm.model import get_neuron_masks, set_neuron_masks


class NeuronMasker:
    """Forward pre-hooks on every layer's down_proj: multiply its input (the FFN activations
    silu(gate) * up, (B, T, F)) by `masks[layer]` and, with `record`, keep the unmasked activations.

    This is the pure-PyTorch "act * mask" path: differentiable in the mask (the straight-through
    scores of movement and GUM train through it) and it exposes the activations that GUM's
    regulariser and the redundancy measures need, whatever path MLP.forward takes. (The stage itself
    masks with minilm.model.set_neuron_masks; see minilm/stages/prune.py.)
    """

    def __init__(self, model, record: bool = False):
        layers = model.model.layers
        self.masks: list = [None] * len(layers)
        self.acts: list = [None] * len(layers)
        self.record = record
        self._handles = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i))
                         for i, layer in enumerate(layers)]

    def _hook(self, layer: int):
        def hook(module, inputs):
            (h,) = inputs                       # (B, T, F): the FFN activations down_proj is about to read
            if self.record:
                self.acts[layer] = h
            mask = self.masks[layer]
            return None if mask is None else (h * mask.to(h.dtype),)   # None: the input goes on unchanged
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def max_cosine_similarity(acts: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(F,) for each neuron, max |cos| of its activations (column of `acts` (N, F)) to another kept one.

    Pruned neurons (keep == 0) get NaN; a kept neuron with no kept partner gets 0.
    """
    n = acts.shape[1]
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep.bool().cpu()
    a = F.normalize(acts.detach().float().cpu(), dim=0)    # unit columns (N, F)
    sim = (a.T @ a).abs()                                  # (F, F) |cosine|: down_proj can absorb a sign
    sim[~keep[None, :].expand(n, n)] = 0.0          # only kept partners count
    sim.fill_diagonal_(0.0)
    nearest = sim.max(dim=1).values
    nearest[~keep] = float("nan")
    return nearest


def neuron_sensitivity(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(F,) |sum over tokens of h * dL/dh|: first-order loss change from removing each neuron."""
    return (acts.detach().float() * grads.detach().float()).sum(0).abs()


def _nanmean(x: torch.Tensor) -> float:
    return float(x[~x.isnan()].mean()) if (~x.isnan()).any() else float("nan")


def redundancy_report(model, batch: dict, masks: list | None = None, max_tokens: int = 1024) -> dict:
    """Per-layer redundancy, sensitivity and density of `model` under `masks` on one probe batch.

    batch: {"tokens", "targets", "attention_mask"} (as minilm.post.chat.collate makes). The
    activations are read at the input of each down_proj (where the mask applies).
    """
    own = get_neuron_masks(model)            # measured through the hooks' act * mask path instead,
    set_neuron_masks(model, [None] * len(own))   # which exposes activations and their gradients
    masker = NeuronMasker(model, record=True)
    n_layers = len(masker.masks)
    masker.masks = list(masks) if masks is not None else [None] * n_layers
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    try:
        with torch.enable_grad():
            _, loss = model(batch["tokens"], batch["targets"], attention_mask=batch.get("attention_mask"))
            for h in masker.acts:
                h.retain_grad()          # non-leaf tensors: keep dL/dh for the sensitivity
            loss.backward()
        valid = (batch["attention_mask"] if batch.get("attention_mask") is not None
                 else torch.ones_like(batch["tokens"])).bool().flatten()
        report = {"redundancy": [], "sensitivity": [], "density": [], "loss": loss.item()}
        for layer, h in enumerate(masker.acts):
            acts = h.flatten(0, 1)[valid][:max_tokens].cpu()             # (N, F) real tokens only
            grads = h.grad.flatten(0, 1)[valid][:max_tokens].cpu()
            keep = masker.masks[layer]
            keep = torch.ones(acts.shape[1]) if keep is None else keep.detach().float().cpu()
            sens = neuron_sensitivity(acts, grads)
            sens[keep == 0] = float("nan")
            report["redundancy"].append(_nanmean(max_cosine_similarity(acts, keep)))
            report["sensitivity"].append(_nanmean(sens))
            report["density"].append(float(keep.mean()))
    finally:
        masker.remove()
        set_neuron_masks(model, own)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return report
