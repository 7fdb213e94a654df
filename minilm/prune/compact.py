"""Compaction: turn a neuron-masked model into a smaller dense one that computes the same function.

After structured pruning (arXiv 2302.03773, section 3: "the pruned model is a smaller dense model"),
each layer's FFN keeps K_l of its neurons. `compact_model` copies the model with only those neurons
(gate/up rows and down columns gathered by `minilm.ops.compact_ffn`), records the widths in
`config.d_ff_per_layer`, and leaves every other weight as it is. The result has no masks, runs plain
dense matmuls of width K_l, saves and loads with minilm/checkpoint.py, and exports to Hugging Face
(padded back to one width with zero neurons, which contribute exactly 0; see `export_hf`).

    from minilm.model import set_neuron_masks
    from minilm.prune.compact import compact_model
    set_neuron_masks(model, masks)        # one (d_ff,) 0/1 tensor per layer, None = keep all
    small = compact_model(model)          # small(idx) == model(idx), up to rounding

    python -m pytest -q tests/test_compact.py

Deviation: none in the math; the paper reports speed-ups of compacted models, measured here by
benchmarks/ffn_masking.py.
"""

from __future__ import annotations

import dataclasses

import torch

from minilm import MinilmError
from minilm.lora import base_state_dict, lora_layers
from minilm.model import Phi3, get_neuron_masks
from minilm.ops import compact_ffn


def _prunable_masks(model: Phi3, masks: list | None) -> list[torch.Tensor | None]:
    """The masks to apply, one per layer, each checked to be 0/1 and not a straight-through tensor."""
    masks = get_neuron_masks(model) if masks is None else list(masks)
    if len(masks) != model.config.n_layer:
        raise MinilmError(f"compact_model: got {len(masks)} masks for {model.config.n_layer} layers; pass "
                          f"one per layer (None keeps a layer whole)")
    device = model.model.embed_tokens.weight.device
    return [None if m is None else m.detach().to(device) for m in masks]


def compacted_widths(model: Phi3, masks: list | None = None) -> tuple[int, ...]:
    """The FFN width each layer would have after compaction."""
    cfg = model.config
    return tuple(cfg.ffn_width(i) if m is None else int(m.count_nonzero())
                 for i, m in enumerate(_prunable_masks(model, masks)))


@torch.no_grad()
def compact_model(model: Phi3, masks: list[torch.Tensor | None] | None = None) -> Phi3:
    """A new Phi3 whose layer l holds only the kept neurons of masks[l] (default: the model's own
    neuron masks); same device and dtype, no masks, config.d_ff_per_layer set. `model` is unchanged."""
    model = getattr(model, "module", model)  # unwrap DDP
    if lora_layers(model):
        raise MinilmError("compact_model: the model carries LoRA adapters; merge them into the weights "
                          "first (minilm.lora) so that compaction keeps what the model computes")
    masks = _prunable_masks(model, masks)
    widths = compacted_widths(model, masks)
    cfg = dataclasses.replace(model.config, d_ff_per_layer=widths)
    state = base_state_dict(model)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        prefix = f"model.layers.{i}.mlp."
        # gate_up (2F, D) -> (2K, D) and down (D, F) -> (D, K): only the kept neurons' slices
        state[prefix + "gate_up_proj.weight"], state[prefix + "down_proj.weight"] = compact_ffn(
            state[prefix + "gate_up_proj.weight"], state[prefix + "down_proj.weight"], mask)
    weight = model.model.embed_tokens.weight
    small = Phi3(cfg).to(device=weight.device, dtype=weight.dtype)
    small.load_state_dict(state)  # strict: every name and (new) shape must fit
    return small.train(model.training)
