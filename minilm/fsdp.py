"""FSDP2: weights, gradients and AdamW state sharded over the ranks (lesson 03, "Past one GPU").

    model = shard_model(Phi3(cfg), rt, bf16=True)       # under torchrun, after loading any weights
    optimizer = make_optimizer(model, cfg.optim)         # after sharding: AdamW's state is sharded too
    with gradient_sync(model, last_micro_batch): loss.backward()
    names = param_names(optimizer, model)                # once, right after building the optimizer
    model_sd, optim_sd = full_state(model, optimizer, names)   # every rank calls it; rank 0 gets full tensors

DDP keeps a full copy of weights, gradients and AdamW moments on every GPU: 16 bytes per parameter
each (minilm/memory.py). FSDP (Zhao et al. 2023, arXiv 2304.11277) keeps 1/W of them per rank: each
decoder layer's parameters are flat shards, all-gathered just before the layer runs and freed
after; its gradients are reduce-scattered (averaged, as DDP does) so each rank updates only its
shard. This is PyTorch's own engine, `torch.distributed.fsdp.fully_shard`, applied per decoder
layer and then to the root (embeddings, final norm, head).

Checkpoints stay the unsharded format: `full_state` gathers the full state dicts, and
`load_full_optimizer_state` shards a full one on resume, so a run may be saved sharded and resumed
unsharded or the other way round. AdamW's state is kept in the unsharded optimizer's own layout
(parameters by index in group order), converted from and to the names FSDP's helpers use.
On GPUs the layers compute in bf16 with fp32 gradient reduction (`MixedPrecisionPolicy`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model, rt, bf16: bool = False):
    """Shard `model` in place over the process group: each decoder layer, then the root."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and rt.device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model, sync: bool):
    """A context in which backward exchanges gradients only when `sync` (the last micro-batch)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not sync:   # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def param_names(optimizer, model) -> list[str]:
    """The names of the optimizer's parameters in its group order: index i of its state dict.
    Call it right after building the optimizer: FSDP swaps the parameter objects it registers
    (sharded, unsharded) around forward and backward."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_name(optim_sd: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by index (torch's layout) -> keyed by parameter name."""
    return {"state": {names[i]: s for i, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}


def by_index(optim_sd: dict, names: list[str]) -> dict:
    """The inverse of `by_name`."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]}


def full_state(model, optimizer, names: list[str]) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict), full tensors on CPU on rank 0. A collective: call
    it on every rank (the other ranks get empty dicts). `names`: `param_names` of the optimizer."""
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    return model_sd, (by_index(optim_sd, names) if optim_sd.get("state") else {})


def load_full_optimizer_state(model, optimizer, optim_sd: dict, names: list[str]) -> None:
    """Load a full (unsharded, index-keyed) AdamW state into the sharded optimizer of `model`."""
    named = by_name(optim_sd, names)
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
