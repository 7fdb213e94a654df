"""The training loop shared by every post-training stage (SFT, reward, DPO, ...).

    from minilm.post.loop import PostConfig, init_model, run_loop
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
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from minilm import MinilmError, lora
from minilm.checkpoint import load_checkpoint, read_config, save_checkpoint
from minilm.runtime import setup_runtime
from minilm.train import lr_at, make_optimizer, plot_losses

DEFAULT_LORA_TARGETS = "qkv_proj,o_proj,gate_up_proj,down_proj"


@dataclass
class PostConfig:
    out_dir: str = "runs/post"      # checkpoint/, metrics.jsonl, loss.png
    init: str = ""                  # the checkpoint to start from (e.g. runs/base-tiny/checkpoint)
    max_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    ckpt_every: int = 50
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    lora_r: int = 0                 # 0: full fine-tune; > 0: LoRA of this rank, base frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_LORA_TARGETS  # comma-separated regexes over nn.Linear names


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


def from_preset(cls, presets: dict, preset: str, stage: str, **overrides):
    """`cls(**presets[preset], **overrides)`: a stage's config from its named CPU/GPU preset."""
    if preset not in presets:
        raise MinilmError(f"unknown {stage} preset {preset!r}; choose one of {', '.join(presets)}")
    return cls(**{**presets[preset], **overrides})


def lora_targets(cfg: PostConfig) -> tuple[str, ...]:
    """cfg.lora_targets as a tuple of regexes (a comma-separated string or a sequence)."""
    targets = cfg.lora_targets
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    targets = tuple(t for t in targets if t)
    if not targets:
        raise MinilmError("lora_targets is empty; name the layers to adapt, e.g. 'qkv_proj,o_proj'")
    return targets


def add_lora(cfg: PostConfig, model, adapter: str = "default") -> list[str]:
    """Wrap cfg's target layers with LoRA (rank cfg.lora_r) and freeze the rest of `model`."""
    if cfg.lora_r <= 0:
        raise MinilmError(f"lora_r must be > 0 to add LoRA adapters, got {cfg.lora_r}")
    wrapped = lora.apply_lora(model, targets=lora_targets(cfg), r=cfg.lora_r, alpha=cfg.lora_alpha,
                              dropout=cfg.lora_dropout, adapter=adapter, freeze_base=True)
    if not wrapped:
        raise MinilmError(f"lora_targets {cfg.lora_targets!r} matched no nn.Linear layer of the model")
    return wrapped


def init_model(cfg: PostConfig, device="cpu", adapter: str = "default"):
    """(model, tokenizer) from the cfg.init checkpoint, with LoRA added when cfg.lora_r > 0."""
    if not cfg.init:
        raise MinilmError("no starting checkpoint: pass --init DIR (e.g. runs/base-tiny/checkpoint)")
    ck = load_checkpoint(cfg.init, device=device)
    if ck.tokenizer is None:
        raise MinilmError(f"{cfg.init} has no tokenizer; post-training needs one to render chats")
    if lora.adapter_names(ck.model):
        # a LoRA stage's output (e.g. SFT with --lora-r): its adapters are part of the model this
        # stage starts from, so fold them in for good; "LoRA off" must then mean that model, and
        # a full fine-tune must find every weight trainable again
        lora.merge_and_unload(ck.model)
    if cfg.lora_r > 0:
        add_lora(cfg, ck.model, adapter)
    return ck.model, ck.tokenizer


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


def train_step(model, optimizer, batch, loss_fn, cfg: PostConfig, rt, step: int) -> dict:
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


def run_loop(cfg: PostConfig, model, batch_fn: Callable, loss_fn: Callable, eval_fn: Callable | None,
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
