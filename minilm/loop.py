"""The training loop shared by every post-training stage (SFT, reward, DPO, ...).

    from minilm.post.base_model import PostConfig, init_model
    from minilm.loop import run_loop
    model, tok = init_model(cfg)                     # cfg.init checkpoint (+ LoRA if cfg.lora_r > 0)
    summary = run_loop(cfg, model, batch_fn, loss_fn, eval_fn, save_fn=None, tokenizer=tok)

A stage supplies four small functions and the loop does the rest:

    batch_fn(step) -> batch           a PURE function of (cfg.seed, step): this is what makes
                                      resume exact without saving a data-loader position
    loss_fn(model, batch) -> (loss, metrics dict)
    eval_fn(model) -> metrics dict    called every eval_every steps and at the end (no_grad, eval mode)
    save_fn(ckpt_dir, train_state, meta)   writes the stage's checkpoint; default: save_checkpoint

One step: lr from warmup + cosine (minilm.train.lr_at), forward/backward under autocast, clip the
global grad norm, AdamW over the parameters with requires_grad only (minilm.train.make_optimizer:
frozen base weights under LoRA get no optimizer state at all). Every ckpt_every steps an atomic
checkpoint whose train_state.pt holds the optimizer, the step, the RNG states and a copy of every
trainable parameter. Resume rebuilds the model from cfg.init exactly as the first run did (frozen
weights come from there), then restores the trainable parameters, optimizer and RNG, so a run
killed at any point (Ctrl-C included) and restarted ends bit-identical to an uninterrupted one.

Simplifications against a full trainer: no gradient accumulation and no DDP (post-training
batches of the CPU presets are small); stages that need them can loop over micro-batches inside
loss_fn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from minilm import MinilmError
from minilm.checkpoint import read_config, save_checkpoint
from minilm.plots import plot_losses
from minilm.runtime import setup_runtime


def epoch_batches(n: int, batch_size: int, seed: int):
    """picks(step) -> the `batch_size` example indices of step `step`: shuffled passes over n examples,
    one permutation per epoch. A pure function of (seed, step), so a resumed run sees exactly the
    batches the uninterrupted one would have seen (no data-loader position to save)."""
    if n < 1:
        raise MinilmError("no training examples to draw batches from")

    @lru_cache(maxsize=4)
    def permutation(epoch: int) -> list[int]:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order

    def picks(step: int) -> list[int]:
        return [permutation(i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)]
    return picks


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with decay on weight matrices only; norms and the (tied) embedding are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))



def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter with requires_grad, by name: what resume must restore."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
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


def _resume(ckpt_dir: Path, model, optimizer) -> tuple[int, dict]:
    """Restore trainable parameters, optimizer and RNG from ckpt_dir; returns (step, train_state)."""
    read_config(ckpt_dir)  # finishes a save that was killed between its renames
    state = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state.get("trainable", {})
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise MinilmError(f"{ckpt_dir} was written by a run with other trainable parameters "
                          f"({len(saved)} saved vs {len(params)} now; LoRA settings differ?); use "
                          f"another --out-dir or --no-resume to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    tqdm.write(f"resuming from {ckpt_dir} at step {state['step']}")
    return state["step"], state


def _write_metrics(metrics: list[dict], out_dir: Path) -> None:
    """metrics.jsonl atomically (temp file + rename), then loss.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    tmp.replace(out_dir / "metrics.jsonl")
    plot_losses(metrics, out_dir / "loss.png")


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]  # rows a killed run logged after its checkpoint


def train_step(model, optimizer, batch, loss_fn, cfg, rt, step: int) -> dict:
    """One optimizer step on one batch; returns its metrics row (with the batch's real tokens)."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with rt.autocast():
        loss, metrics = loss_fn(model, _to_device(batch, rt.device))
    if not torch.isfinite(loss):
        raise MinilmError(f"loss became {loss.item()} at step {step + 1}; lower --lr or check the data")
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm,
           "batch_tokens": count_tokens(batch)}
    row.update({k: float(v) for k, v in metrics.items()})
    return row


def run_loop(cfg, model, batch_fn: Callable, loss_fn: Callable, eval_fn: Callable | None,
             save_fn: Callable | None = None, tokenizer=None, stage: str = "post", rt=None,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` for cfg.max_steps (resuming from cfg.out_dir/checkpoint); returns a summary.

    `save_fn(ckpt_dir, train_state, meta)` defaults to save_checkpoint(ckpt_dir, model, tokenizer,
    train_state, meta). `on_step(step, row)` runs after every step (tests interrupt runs with it).
    """
    rt = rt or setup_runtime(cfg.device)
    model.to(rt.device).train()
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoint"
    if save_fn is None:
        def save_fn(directory, train_state, meta):
            save_checkpoint(directory, model, tokenizer, train_state, meta)
    optimizer = make_optimizer(model, cfg)
    if not optimizer.param_groups[0]["params"] and not optimizer.param_groups[1]["params"]:
        raise MinilmError("the model has no trainable parameters (every requires_grad is False)")
    start, tokens = 0, 0
    if cfg.resume and (ckpt_dir / "train_state.pt").exists():
        start, state = _resume(ckpt_dir, model, optimizer)
        tokens = state.get("tokens", 0)
    metrics = _read_metrics(out_dir / "metrics.jsonl", start)
    last_eval = next((m for m in reversed(metrics) if "eval" in m), {}).get("eval", {})

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            result = eval_fn(model) if eval_fn is not None else {}
        model.train()
        return {k: float(v) for k, v in result.items()}

    t0 = time.time()
    with tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=stage) as bar:
        for step in bar:
            row = train_step(model, optimizer, batch_fn(step), loss_fn, cfg, rt, step)
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
            if row["step"] % cfg.ckpt_every == 0 or done:
                state = {"optimizer": optimizer.state_dict(), "step": row["step"], "rng": _rng_state(),
                         "trainable": trainable_state(model), "config": dataclasses.asdict(cfg), "tokens": tokens}
                meta = {"stage": stage, "step": row["step"], "init": cfg.init, **last_eval}
                save_fn(ckpt_dir, state, meta)
                _write_metrics(metrics, out_dir)
            if on_step is not None:
                on_step(row["step"], row)
    losses = [m["loss"] for m in metrics]
    return {"stage": stage, "step": cfg.max_steps, "checkpoint": str(ckpt_dir), "tokens": tokens,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            **last_eval}
