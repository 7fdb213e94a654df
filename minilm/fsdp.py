"""FSDP2: weights, gradients and AdamW state sharded over the ranks (lesson 03, "Past one GPU").

    model = shard_model(Phi3(cfg), rt)                   # under torchrun, after loading any weights
    optimizer = make_optimizer(model, cfg.optim)         # after sharding: AdamW's state is sharded too
    with gradient_sync(model, last_micro_batch): loss.backward()
    names = param_names(optimizer, model)                # once, right after building the optimizer
    plain, optim_sd = unsharded(model, optimizer, names, rt)   # every rank calls it; rank 0 gets the copy

DDP keeps a full copy of weights, gradients and AdamW moments on every GPU: 16 bytes per parameter
each (minilm/memory.py). FSDP (Zhao et al. 2023, arXiv 2304.11277) keeps 1/W of them per rank: each
decoder layer's parameters are flat shards, all-gathered just before the layer runs and freed
after; its gradients are reduce-scattered (averaged, as DDP does) so each rank updates only its
shard. This is PyTorch's own engine, `torch.distributed.fsdp.fully_shard`, applied per decoder
layer and then to the root (embeddings, final norm, head).

Checkpoints stay the unsharded format: `full_state` gathers the full state dicts (`unsharded`
builds the plain model rank 0 saves), and `load_full_optimizer_state` shards a full one on resume,
so a run may be saved sharded and resumed unsharded or the other way round. AdamW's state is kept
in the unsharded optimizer's own layout (parameters by index in group order), converted from and to
the names FSDP's helpers use. A frozen model (DPO's reference) is sharded the same way, without an
optimizer. On GPUs the layers compute in bf16 with fp32 gradient reduction (`MixedPrecisionPolicy`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from minilm import MinilmError
from minilm.model import Phi3

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model, rt):
    """Shard `model` in place over the process group: each decoder layer, then the root. On a GPU
    under bf16 autocast (rt) the layers compute in bf16 and reduce gradients in fp32."""
    bf16 = rt.device.type == "cuda" and rt.autocast_dtype == torch.bfloat16
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
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


def unsharded(model, optimizer, names: list[str], rt) -> tuple:
    """(model, AdamW state) as a checkpoint holds them. A sharded model: a collective (every rank
    calls it) that gives rank 0 a plain Phi3 with the full weights and the full AdamW state, and the
    other ranks (None, {}). An unsharded model: itself and optimizer.state_dict()."""
    if not is_sharded(model):
        return model, optimizer.state_dict()
    weights, optim_sd = full_state(model, optimizer, names)
    if not rt.is_main:
        return None, {}
    with torch.random.fork_rng(devices=[]):   # its random init must not move the RNG a resume restores
        plain = Phi3(model.config)
    plain.load_state_dict(weights)
    return plain, optim_sd


def load_full_optimizer_state(model, optimizer, optim_sd: dict, names: list[str]) -> None:
    """Load a full (unsharded, index-keyed) AdamW state into the optimizer of `model`, sharding it
    when `model` is sharded."""
    if not is_sharded(model):
        optimizer.load_state_dict(optim_sd)
        return
    named = by_name(optim_sd, names)
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


# ---- the post-training loop's data parallelism (minilm/loop.py) ----------------------------------

def sharded_run(cfg, rt) -> bool:
    """Whether this run shards its model over torchrun's ranks (cfg.fsdp under torchrun), after
    refusing what the post-training loop cannot do: torchrun without --fsdp (it has no DDP), LoRA
    under FSDP, and a batch that does not cut into the micro-batches (`micro_batches`)."""
    fsdp = getattr(cfg, "fsdp", False)
    if rt.distributed and not fsdp:
        raise MinilmError(f"under torchrun ({rt.world_size} processes) post-training runs data parallel "
                          f"only with --fsdp (sft, dpo, dno); add --fsdp, or run the stage as one process")
    if rt.distributed and getattr(getattr(cfg, "lora", None), "r", 0) > 0:
        raise MinilmError("--fsdp shards a full fine-tune; LoRA (--lora-r) trains on one process: drop "
                          "--lora-r, or run the stage without torchrun")
    micro_batches(cfg, rt)
    return rt.distributed


def micro_batches(cfg, rt) -> tuple[int, int]:
    """(P, A): each step's batch is cut into P = cfg.micro_batches parts (0: one per rank), and each
    of the W ranks runs A = P / W of them. The cut does not depend on W, so neither does the math."""
    parts = getattr(cfg, "micro_batches", 0) or rt.world_size
    batch_size = getattr(cfg, "batch_size", parts)   # LoopConfig has none: the stage checked its own
    if parts % rt.world_size or batch_size % parts:
        raise MinilmError(f"batch_size {batch_size} must cut into micro_batches {parts} equal parts, a multiple "
                          f"of the {rt.world_size} process(es); change --batch-size or --micro-batches")
    return parts, parts // rt.world_size
