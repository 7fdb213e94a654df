"""Exact resume and the metrics log, shared by every training loop (pretraining, post-training, PPO, LTC).

    state = load_train_state(ckpt_dir)            # train_state.pt: trainable weights, AdamW, RNG, step
    step = restore(state, optimizer, model)       # or restore_trainable / restore_rng, piece by piece
    metrics = read_metrics(out_dir / "metrics.jsonl", step)   # rows a killed run logged past it dropped
    write_metrics(metrics, out_dir)               # atomically, with its loss curve loss.png

A checkpoint holds what a resumed run needs to continue bit-identical to an uninterrupted one: the
trainable parameters (all of them, or only LoRA's), the optimizer state and the RNG states
(`rng_state`). Batches are pure functions of (seed, step) (minilm/loop.py's `epoch_batches`), so no
data-loader position is saved. Writing is minilm/checkpoint.py's job (atomic renames); this module
reads a train state back and puts a run where it left off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.checkpoint import read_config, read_train_state
from minilm.plots import plot_losses
from minilm.weights import write_text


def rng_state() -> dict:
    """The RNG states a resumed run must restore (CPU, and every GPU's when there are GPUs)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        # dropout and sampling on GPU draw from these
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter with requires_grad, by name: what resume must restore."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_train_state(ckpt_dir: Path) -> dict:
    """ckpt_dir/train_state.pt, after finishing any save that was killed between its renames."""
    read_config(ckpt_dir)  # recovers an interrupted save
    return read_train_state(Path(ckpt_dir) / "train_state.pt")


def restore(state: dict, optimizer, model=None, source: str = "the checkpoint") -> int:
    """Put a run back where `state` (a train_state.pt) left it: the trainable parameters of `model`
    (when given; the names and shapes must match), the optimizer and the RNG. Returns the step."""
    if model is not None:
        restore_trainable(state, model, source)
    optimizer.load_state_dict(state["optimizer"])  # AdamW moments and step counts
    return restore_rng(state)


def restore_trainable(state: dict, model, source: str = "the checkpoint") -> None:
    """The weights part of `restore`: copy state["trainable"] into `model` (an unsharded one)."""
    # only the trainable parameters: the frozen rest is the model the stage started from
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state.get("trainable", {})
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise MinilmError(f"{source} was written by a run with other trainable parameters "
                          f"({len(saved)} saved vs {len(params)} now; LoRA settings differ?); use "
                          f"another --out-dir or --no-resume to start over")
    with torch.no_grad():
        # in place: an optimizer may hold references to these tensors
        for n, p in params.items():
            p.copy_(saved[n])


def restore_rng(state: dict) -> int:
    """The RNG part of `restore`; returns the step."""
    # sampling, dropout and minibatch order continue exactly where the run stopped
    # (a loop that reseeds every iteration, as LTC does, saves none)
    if "rng" in state:
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state.get("step", 0)


def read_metrics(path: Path, upto: int) -> list[dict]:
    """The rows of a metrics.jsonl up to step `upto` (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]  # rows past the checkpoint are redone


def write_metrics(metrics: list[dict], out_dir: Path, baseline: float | None = None, plot: bool = True) -> None:
    """out_dir/metrics.jsonl, atomically, and its loss curve out_dir/loss.png."""
    write_text(Path(out_dir) / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    if plot:
        plot_losses(metrics, Path(out_dir) / "loss.png", baseline)
