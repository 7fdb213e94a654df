"""The pieces every training loop shares: optimizer and schedule, one optimizer step, resume, logs.

    optim = OptimConfig(lr=3e-3, warmup_steps=30)
    optimizer = make_optimizer(model, optim)            # AdamW, decay on matrices only
    lr = set_lr(optimizer, lr_at(step, optim, max_steps))
    loss.backward(); grad_norm = optimizer_step(optimizer, params, optim.grad_clip)

Every loop in minilm (pretraining in stages/pretrain.py, PPO, LTC, and `run_loop` below, which the
other post-training stages share) calls these and minilm/resume.py's exact resume and metrics log,
so each exists once. A batch is always a pure function of (seed, step) (`epoch_batches`,
TokenDataset), so a resumed run needs no data-loader position: it restores parameters, optimizer
and RNG states and continues bit-identical to an uninterrupted run.

`run_loop(cfg, model, batch_fn, loss_fn, eval_fn, save_fn)` is the post-training loop: a stage
gives it how to draw a batch, compute the loss and evaluate, and it runs steps, evals, atomic
checkpoints (with every trainable parameter, so LoRA runs save only what changed) and metrics.jsonl.
Data parallel (lesson 03, "FSDP for post-training"): cfg.micro_batches cuts each step's batch into
P micro-batches, averaged; under torchrun with cfg.fsdp rank r of W runs parts r, r + W, ... of
them on a model sharded by minilm/fsdp.py, so a run on any W dividing P trains the same model.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from minilm import MinilmError
from minilm.checkpoint import has_train_state, save_checkpoint
from minilm.config import Validated
from minilm.fsdp import (gradient_sync, load_full_optimizer_state, micro_batches, param_names, shard_model,
                         sharded_run, unsharded)
from minilm.ops.adamw import AdamW
from minilm.resume import (load_train_state, read_metrics, restore_rng, restore_trainable, rng_state,
                           trainable_state, write_metrics)
from minilm.runtime import setup_runtime


@dataclass
class OptimConfig(Validated):
    """AdamW and its schedule: linear warmup to lr, then cosine decay to lr * min_lr_ratio."""
    lr: float = 1e-3                # peak learning rate, reached after the warmup
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 10          # linear warmup from 0 to lr
    weight_decay: float = 0.0       # on weight matrices only
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0          # max global gradient norm


@dataclass
class LoopConfig(Validated):
    """What `run_loop` reads. The stage configs that call run_loop have these fields themselves; this
    class serves loops that are a part of a stage (LTC's imitation phase, each DNO iteration)."""
    out_dir: str
    init: str = ""                  # the checkpoint the model came from (recorded in its meta)
    max_steps: int = 100            # optimizer steps
    eval_every: int = 50            # held-out evaluation every N steps
    ckpt_every: int = 50            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batches: int = 0          # each step's batch in N micro-batches over all ranks (0: one per rank)
    fsdp: bool = False              # under torchrun: data parallel, weights, gradients and AdamW sharded
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the layer in backward


# ---- optimizer and schedule ----------------------------------------------------------------------

def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.lr * optim.min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps  # step + 1: step 0 already moves
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)  # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0; flat past max_steps
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> AdamW:
    """AdamW over the parameters with requires_grad (frozen LoRA bases get no state at all), with
    weight decay on matrices only: norms and the (tied) embedding are not decayed. minilm's AdamW is
    torch.optim.AdamW with the CPU update fused into one pass (minilm/ops/adamw.py), bit for bit."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen: no AdamW state
            continue
        # decaying norms' gains would pull them towards 0; the tied embedding is also the output layer
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def trained_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Every parameter the optimizer updates, in its group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_step(optimizer: torch.optim.Optimizer, params, grad_clip: float, where: str = "this step") -> float:
    """After backward: clip the global gradient norm of `params`, step, zero the gradients.
    Returns the norm before clipping (the number to watch for divergence).

    A diverged run stops here, before anything non-finite can reach a checkpoint: a NaN/inf gradient
    norm (a NaN loss has one too) stops it before the step, and weights the step made non-finite stop
    it before the next save. `where` names the step in the message."""
    params = list(params)
    # one norm over all of `params` together (not per tensor), so clipping keeps the update's direction
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()   # FSDP: a DTensor
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise MinilmError(f"the gradient norm became {grad_norm} at {where}: the run diverged. The last "
                          f"checkpoint is kept; train again with a lower --lr into a new --out-dir")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # None, not zeros: frees the memory
    # one sync for all tensors; an FSDP rank checks its own shards
    if not torch.stack([local_tensor(p).detach().isfinite().all() for p in params]).all():
        raise MinilmError(f"the weights became non-finite at {where} (the update overflowed). The last "
                          f"checkpoint is kept; train again with a lower --lr into a new --out-dir")
    return grad_norm


# ---- batches -------------------------------------------------------------------------------------

def epoch_batches(n: int, batch_size: int, seed: int):
    """picks(step) -> the `batch_size` example indices of step `step`: shuffled passes over n examples,
    one permutation per epoch. A pure function of (seed, step), so a resumed run sees exactly the
    batches the uninterrupted one would have seen (no data-loader position to save)."""
    if n < 1:
        raise MinilmError("no training examples to draw batches from")

    @lru_cache(maxsize=4)
    def permutation(epoch: int) -> list[int]:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)  # one seed per (seed, epoch)
        return order

    def picks(step: int, part: int = 0, parts: int = 1) -> list[int]:
        # global example positions step*B .. (step+1)*B - 1, each mapped through its epoch's shuffle;
        # micro-batch `part` of `parts` (minilm/loop.py's train_step) takes every parts-th of them
        step_picks = [permutation(i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)]
        return step_picks[part::parts]
    return picks


def to_device(batch, device):
    """A batch (tensor, or dicts/lists/tuples of them, nested) moved to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch) -> int:
    """Real (non-padding) tokens in a batch: the sum of every "attention_mask" in it, however nested
    (SFT batches have one, preference batches one per side, Hydra-SFT batches one per sub-batch)."""
    if isinstance(batch, dict):
        return sum(int(v.sum()) if k == "attention_mask" and torch.is_tensor(v) else count_tokens(v)
                   for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return sum(count_tokens(v) for v in batch)
    return 0


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a DTensor); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---- the post-training loop ----------------------------------------------------------------------

def train_step(model, optimizer, batch_fn, loss_fn, cfg, rt, step: int) -> dict:
    """One optimizer step: this rank's micro-batches of the step's batch, their gradients summed
    (and averaged over the ranks under FSDP), clip, AdamW. Returns its metrics row: the loss and
    every metric averaged over all the step's micro-batches, and the batch's real tokens."""
    # the schedule is a pure function of the step: a resumed run continues it
    lr = set_lr(optimizer, lr_at(step, cfg.optim, cfg.max_steps))
    parts, accum = micro_batches(cfg, rt)
    sums, tokens = {}, 0
    for micro in range(accum):
        part = micro * rt.world_size + rt.rank   # rank r runs parts r, r + W, ...
        batch = batch_fn(step) if parts == 1 else batch_fn(step, part, parts)   # fixed by (seed, step, part)
        # FSDP exchanges gradients on the last micro-batch only: one reduce-scatter per step
        with gradient_sync(model, micro == accum - 1), rt.autocast():
            loss, metrics = loss_fn(model, to_device(batch, rt.device))  # a 0-dim loss; metrics: name -> number
        # / accum: the sum is this rank's mean over its micro-batches (FSDP averages the ranks' means)
        (loss / accum).backward()
        for name, value in {"loss": loss.item(), **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value) / accum
        tokens += count_tokens(batch)   # real tokens, padding excluded
    if rt.distributed:   # the means over every rank's micro-batches, the tokens summed
        t = torch.tensor([*sums.values(), tokens], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t)
        sums, tokens = {k: v / rt.world_size for k, v in zip(sums, t.tolist())}, int(t[-1].item())
    # stop before a NaN reaches the weights (and a checkpoint): the last checkpoint stays good
    if not math.isfinite(sums["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise MinilmError(f"loss became {sums['loss']} at step {step + 1}; lower --lr or check the data")
    # the norm over exactly what AdamW updates (under LoRA: adapters and heads), never a frozen base
    grad_norm = optimizer_step(optimizer, trained_params(optimizer), cfg.optim.grad_clip, f"step {step + 1}")
    row = {"step": step + 1, "loss": sums.pop("loss"), "lr": lr, "grad_norm": grad_norm, "batch_tokens": tokens}
    row.update(sums)
    return row


def run_loop(cfg, model, batch_fn: Callable, loss_fn: Callable, eval_fn: Callable | None,
             save_fn: Callable | None = None, tokenizer=None, stage: str = "post", rt=None,
             on_step: Callable[[int, dict], None] | None = None, meta: dict | None = None) -> dict:
    """Train `model` for cfg.max_steps (resuming from cfg.out_dir/checkpoint); returns a summary.

    `batch_fn(step)` gives the step's batch, `batch_fn(step, part, parts)` its micro-batch `part`.
    Checkpoints are save_checkpoint(ckpt_dir, model, tokenizer, train_state, meta) with `meta`
    added to the step's, unsharded under FSDP; a stage that saves more (heads beside the LM) passes
    `save_fn(ckpt_dir, train_state, meta)` and runs on one process. `on_step(step, row)` runs after
    every step (tests interrupt runs with it). Under torchrun every rank runs this, rank 0 writes.
    """
    rt = rt or setup_runtime(cfg.device, cfg.dtype)
    sharded = sharded_run(cfg, rt)
    model.to(rt.device).train()  # train mode: dropout on (if any)
    if getattr(cfg, "activation_checkpointing", False):
        model.model.checkpointing = True   # Phi3 recomputes each layer in backward
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoint"
    state = load_train_state(ckpt_dir) if cfg.resume and has_train_state(ckpt_dir) else None
    if state is not None:   # full weights into the full model, before any sharding
        restore_trainable(state, model, str(ckpt_dir))
    if sharded:   # in place: its parameters become DTensors, 1/W of each on this rank
        shard_model(model, rt)
    # after sharding (AdamW's state is then sharded too), before resume loads its state
    optimizer = make_optimizer(model, cfg.optim)
    if not trained_params(optimizer):
        raise MinilmError("the model has no trainable parameters (every requires_grad is False)")
    names = param_names(optimizer, model)   # AdamW's state by index <-> by name (FSDP's helpers)
    start, tokens = 0, 0
    if state is not None:   # AdamW moments and step counts (sharded on load under FSDP), RNG
        load_full_optimizer_state(model, optimizer, state["optimizer"], names)
        start, tokens = restore_rng(state), state.get("tokens", 0)
        if rt.is_main:
            tqdm.write(f"resuming from {ckpt_dir} at step {start}")
    metrics = read_metrics(out_dir / "metrics.jsonl", start)
    last_eval = next((m for m in reversed(metrics) if "eval" in m), {}).get("eval", {})  # a resumed run's last eval

    # every stage's eval runs in eval mode (no dropout) and under no_grad; under FSDP on every
    # rank alike, since each forward all-gathers the layers (the same prompts and weights give the
    # same greedy replies, so every rank's generation stops at the same step)
    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            result = eval_fn(model) if eval_fn is not None else {}
        model.train()
        return {k: float(v) for k, v in result.items()}

    t0 = time.time()
    with tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=stage,
              disable=not rt.is_main) as bar:
        for step in bar:
            # batch_fn is a pure function of (seed, step): no data-loader position to save or restore
            row = train_step(model, optimizer, batch_fn, loss_fn, cfg, rt, step)
            tokens += row["batch_tokens"]
            row["tokens"] = tokens  # trained on so far (the speedrun report's "tokens" column)
            done = row["step"] == cfg.max_steps
            if row["step"] % cfg.eval_every == 0 or done:
                last_eval = evaluate()
                row.update(last_eval)
                row["eval"] = last_eval  # kept nested too, so a resumed run finds the last one
            row["steps_per_s"] = (row["step"] - start) / (time.time() - t0)
            if row["step"] % cfg.log_every == 0 or "eval" in row or done:
                metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            # checkpoint first, then metrics.jsonl: the log never lists a step that no checkpoint holds
            if row["step"] % cfg.ckpt_every == 0 or done:
                # under FSDP every rank helps gather the full weights and AdamW state; rank 0 writes
                plain, optim_state = unsharded(model, optimizer, names, rt)
                if rt.is_main:
                    # "trainable": every requires_grad parameter (LoRA: adapters and heads only), what resume copies back
                    state = {"optimizer": optim_state, "step": row["step"], "rng": rng_state(),
                             "trainable": trainable_state(plain), "config": dataclasses.asdict(cfg), "tokens": tokens}
                    step_meta = {"stage": stage, "step": row["step"], "init": cfg.init, **last_eval, **(meta or {})}
                    if save_fn is None:
                        save_checkpoint(ckpt_dir, plain, tokenizer, state, step_meta)
                    else:
                        save_fn(ckpt_dir, state, step_meta)
                    write_metrics(metrics, out_dir)
                rt.barrier()   # no rank runs ahead of a checkpoint it may read (DNO's next iteration)
            if on_step is not None:
                on_step(row["step"], row)
    losses = [m["loss"] for m in metrics]
    return {"stage": stage, "step": cfg.max_steps, "checkpoint": str(ckpt_dir), "tokens": tokens,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            **last_eval}
