"""Pretraining: next-token prediction with AdamW, warmup + cosine decay, exact resume, DDP or FSDP.

    minilm train --preset tiny                       # CPU, a few minutes
    torchrun --nproc_per_node 4 -m minilm train --preset small --device cuda
    torchrun --nproc_per_node 8 -m minilm train --preset phi3-mini --fsdp --activation-checkpointing

    from minilm.stages.pretrain import TrainConfig, train
    summary = train(train_config("tiny", data_dir="runs/data/stdlib-2048", max_steps=50))

One step (phi-3 and nanoGPT follow the same recipe):
  1. for each of `grad_accum` micro-batches: forward, loss / grad_accum, backward
     (under DDP or FSDP the gradients are averaged across ranks on the last micro-batch only;
     FSDP, minilm/fsdp.py, also shards weights and AdamW state, and checkpoints stay unsharded);
  2. clip the global gradient norm; set the learning rate from the schedule; AdamW step;
  3. every `eval_every` steps: validation loss and bits per byte on fixed windows;
  4. every `ckpt_every` steps: an atomic checkpoint with the optimizer state, so a killed run
     resumes where it stopped and ends exactly where the uninterrupted run would.
Weight decay applies to matrices only, not to norms or embeddings.

Data: prepared shards (cfg.data_dir), one phase, or two with cfg.phase2_dir: phase 1 (filtered,
deduplicated real text) for the first 75% of the steps, phase 2 (its most educational part plus
synthetic textbook exercises) for the last 25%, as Phi-3 trains (arXiv 2404.14219, section 2).
Validation is always phase 1's held-out documents. `minilm train` without --data-dir builds the
data pipeline's two phases first (lesson 05, data_prep/pipeline.py); train() itself builds nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minilm import MinilmError
from minilm.checkpoint import has_train_state, load_checkpoint, save_checkpoint
from minilm.config import ConfigError, Validated, build, get_preset
from minilm.data import TokenDataset, bits_per_byte
from minilm.fsdp import gradient_sync, load_full_optimizer_state, param_names, shard_model, unsharded
from minilm.loop import OptimConfig, lr_at, make_optimizer, optimizer_step, set_lr
from minilm.model import Phi3
from minilm.resume import read_metrics, restore_rng, rng_state, write_metrics
from minilm.run_dir import check_settings, writer_lock
from minilm.runtime import setup_runtime, teardown_runtime
from minilm.tokenizer import Tokenizer


@dataclass
class TrainConfig(Validated):
    preset: str = "tiny"            # model preset, see minilm/config.py
    model: dict = field(default_factory=dict)  # ModelConfig fields overriding the preset
    out_dir: str = "runs/tiny"      # checkpoint/, metrics.jsonl, loss.png
    data_dir: str = ""              # prepared shards; "": the data pipeline's phase 1 (built when missing)
    phase2_dir: str = ""            # shards for the last steps; "" with the default data: its phase 2
    phase2_fraction: float = 0.25   # the last quarter of the steps train on phase 2 (when there is one)
    pipeline_docs_per_source: int = 0    # how much pinned text the default pipeline reads (0: all 927 documents)
    batch_size: int = 16            # sequences per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 0                # 0: the model's max_seq_len
    max_steps: int = 600            # optimizer steps
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1))
    eval_every: int = 100           # held-out evaluation every N steps
    eval_batches: int = 8
    ckpt_every: int = 100           # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    compile: bool = False           # torch.compile, opt-in
    fsdp: bool = False              # under torchrun: shard weights, gradients and AdamW (FSDP2) instead of DDP
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the layer in backward
    resume: bool = True             # continue from out_dir/checkpoint if it exists


log = logging.getLogger("minilm")

# Stage presets: what `--preset NAME` sets besides the model shape.
TRAIN_PRESETS = {
    "tiny": dict(out_dir="runs/tiny", batch_size=16, max_steps=1600, lr=3e-3, warmup_steps=30, eval_every=400,
                 ckpt_every=400, phase2_fraction=0.5),
    "small": dict(out_dir="runs/small", batch_size=32, grad_accum=2, max_steps=5000, lr=1e-3,
                  warmup_steps=200, eval_every=250, ckpt_every=250),
}
# the fields `minilm train --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("out_dir", "data_dir", "phase2_dir", "batch_size", "grad_accum", "max_steps", "lr", "warmup_steps",
         "eval_every", "seed", "device", "dtype", "fsdp", "resume")
# the speedrun's presets: `preset` names the model preset they train
TRAIN_PRESETS["ci"] = dict(TRAIN_PRESETS["tiny"], preset="tiny", max_steps=120, batch_size=8, warmup_steps=10,
                           eval_every=60, ckpt_every=60, eval_batches=4)
TRAIN_PRESETS["laptop"] = dict(TRAIN_PRESETS["tiny"], preset="tiny")
TRAIN_PRESETS["gpu"] = dict(TRAIN_PRESETS["small"], preset="small")


def train_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """A TrainConfig for `preset` (stage defaults for tiny/small), with fields overridden."""
    return build(TrainConfig, **{"preset": preset, **TRAIN_PRESETS.get(preset, {}), **overrides})


@torch.no_grad()
def evaluate(model, data: TokenDataset, cfg: TrainConfig, rt) -> dict:
    """Mean loss over fixed validation windows, and bits per byte."""
    model.eval()
    losses = []
    for x, y in data.eval_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len):
        with rt.autocast():
            # x, y: (B, T) token ids, y is x shifted left by one; [1] is the mean cross-entropy
            losses.append(model(x.to(rt.device), y.to(rt.device))[1].item())
    model.train()
    loss = sum(losses) / len(losses)  # nats per token; bpb rescales by bytes/token
    return {"val_loss": loss, "val_bpb": bits_per_byte(loss, data.bytes_per_token)}


def _setup(cfg: TrainConfig, rt):
    """Data (one or two phases), tokenizer and model config."""
    try:
        model_cfg = get_preset(cfg.preset, **cfg.model)
    except ConfigError as e:
        raise MinilmError(str(e)) from e
    data_dir, phase2_dir = cfg.data_dir, cfg.phase2_dir
    if not data_dir:
        raise MinilmError("no training data: train() takes prepared shards (data_dir); `minilm train` "
                          "builds the default two phases when --data-dir is not given, `minilm data` "
                          "runs the pipeline and `minilm prepare` makes a quick one-phase corpus")
    train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    tokenizer = Tokenizer.load(data_dir)
    train_data.check_tokenizer(tokenizer)
    phase2 = TokenDataset(phase2_dir, "train") if phase2_dir and cfg.phase2_fraction > 0 else None
    if phase2 is not None and Tokenizer.load(phase2_dir).fingerprint() != tokenizer.fingerprint():
        raise MinilmError(f"{phase2_dir} was tokenized with a different tokenizer than {data_dir}; "
                          f"build both phases in one pipeline run (python -m data_prep.pipeline)")
    if tokenizer.n_vocab < model_cfg.vocab_size:
        log.warning("the model's vocab_size %d exceeds the tokenizer's %d ids: %d output rows train toward "
                    "zero probability, and generation never samples them", model_cfg.vocab_size,
                    tokenizer.n_vocab, model_cfg.vocab_size - tokenizer.n_vocab)
    if tokenizer.n_vocab > model_cfg.vocab_size:
        raise MinilmError(f"vocab mismatch: the data in {data_dir} uses {tokenizer.n_vocab} tokens but the "
                          f"model's vocab_size is {model_cfg.vocab_size}; pass --vocab-size "
                          f"{tokenizer.n_vocab} or prepare data with a smaller vocabulary")
    cfg.seq_len = cfg.seq_len or model_cfg.max_seq_len  # 0: full context, kept on cfg
    if cfg.seq_len > model_cfg.max_seq_len:
        raise MinilmError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    return model_cfg, tokenizer, train_data, val_data, phase2


def phase2_start(cfg: TrainConfig) -> int:
    """The first step that trains on phase 2: the last `phase2_fraction` of the run."""
    return cfg.max_steps - round(cfg.max_steps * cfg.phase2_fraction)


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume) a model as `cfg` says; returns a summary of the final metrics.

    `on_step(step, metrics_row)` is called after every step (tests use it to interrupt a run).
    """
    rt = setup_runtime(cfg.device, cfg.dtype)
    try:
        # rank 0 alone writes out_dir, so it alone holds the folder's lock
        with writer_lock(cfg.out_dir) if rt.is_main else contextlib.nullcontext():
            return _train(cfg, rt, on_step)
    finally:
        teardown_runtime(rt)


def train_step(model, optimizer, data: TokenDataset, cfg: TrainConfig, rt, step: int) -> dict:
    """One optimizer step: accumulate `grad_accum` micro-batches, clip, AdamW. Returns its metrics."""
    # the learning rate is a pure function of the step, so a resumed run continues the same schedule
    lr = set_lr(optimizer, lr_at(step, cfg.optim, cfg.max_steps))
    loss_sum = 0.0
    # 1. grad_accum micro-batches of (B, T) ids; their gradients add up in .grad
    for micro in range(cfg.grad_accum):
        # rank r takes global micro-batch indices r, r + W, ...: see minilm/data.py
        x, y = data.batch(cfg.batch_size, cfg.seq_len, cfg.seed, step, micro * rt.world_size + rt.rank)
        last = micro == cfg.grad_accum - 1
        # DDP and FSDP skip their gradient exchange on all but the last micro-batch: one per step
        with gradient_sync(model, last), rt.autocast():
            # divided by grad_accum so the summed gradients are those of the mean over all micro-batches
            loss = model(x.to(rt.device), y.to(rt.device))[1] / cfg.grad_accum
        loss.backward()  # under DDP, the last micro-batch's backward averages gradients over ranks
        loss_sum += loss.item()  # already / grad_accum: sums to the step's mean loss
    # 2. clip the global norm over every parameter (all of them train here), AdamW step, zero the grads
    grad_norm = optimizer_step(optimizer, model.parameters(), cfg.optim.grad_clip, f"step {step + 1}")
    if rt.distributed:  # log the mean loss over all ranks
        t = torch.tensor([loss_sum], device=rt.device)
        dist.all_reduce(t)
        loss_sum = t.item() / rt.world_size
    return {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm}


def _resume_weights(ckpt_dir: Path, model, model_cfg, rt) -> dict:
    """Load the weights of `ckpt_dir` into the (unsharded) model; returns its train_state."""
    ck = load_checkpoint(ckpt_dir, device=rt.device, with_train_state=True)
    if ck.config != model_cfg:
        raise MinilmError(f"{ckpt_dir} holds a different model ({ck.config}); use another "
                          f"--out-dir or --no-resume to start over")
    model.load_state_dict(ck.model.state_dict())   # every weight trains: the checkpoint holds them all
    if rt.is_main:
        tqdm.write(f"resuming from {ckpt_dir} at step {ck.train_state['step']}")
    return ck.train_state


def _save(ckpt_dir: Path, model, optimizer, tokenizer, cfg: TrainConfig, step: int, rt, names: list[str]) -> None:
    """An atomic checkpoint, unsharded whether or not the run is (every rank calls it under FSDP)."""
    model, optim_state = unsharded(model, optimizer, names, rt)   # under FSDP a collective; rank 0 gets the copy
    if rt.is_main:
        # with the weights, all an exact resume needs: batches follow from (seed, step)
        state = {"optimizer": optim_state, "step": step, "rng": rng_state(), "train_config": dataclasses.asdict(cfg)}
        save_checkpoint(ckpt_dir, getattr(model, "_orig_mod", model), tokenizer, state,
                        meta={"stage": "pretrain", "step": step})


def _train(cfg: TrainConfig, rt, on_step) -> dict:
    check_settings(cfg, "pretrain", write=rt.is_main)   # a rerun into out_dir must have the same settings
    model_cfg, tokenizer, train_data, val_data, phase2_data = _setup(cfg, rt)
    switch = phase2_start(cfg) if phase2_data is not None else cfg.max_steps
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoint"
    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
    model = raw_model = Phi3(model_cfg).to(rt.device)  # raw_model: unwrapped, for eval and saving
    model.model.checkpointing = cfg.activation_checkpointing
    saved = None
    if cfg.resume and has_train_state(ckpt_dir):
        saved = _resume_weights(ckpt_dir, model, model_cfg, rt)   # full weights, before any sharding
    sharded = cfg.fsdp and rt.distributed
    if sharded:   # in place: raw_model is the sharded model, its parameters DTensors
        shard_model(model, rt)
    # after sharding (AdamW's state is then sharded too), before loading its saved state
    optimizer = make_optimizer(model, cfg.optim)
    names = param_names(optimizer, model)   # AdamW's state by index <-> by name (FSDP's helpers)
    start = 0
    if saved is not None:
        # a full state, sharded on load under FSDP: a checkpoint does not care how it was trained
        load_full_optimizer_state(model, optimizer, saved["optimizer"], names)
        start = restore_rng(saved)
    metrics = read_metrics(out_dir / "metrics.jsonl", start) if rt.is_main else []  # rows past start are dropped
    # wrap only after resume: the checkpoint's state_dict keys are the raw model's, without prefixes
    if cfg.compile:
        model = torch.compile(model)
    if rt.distributed and not sharded:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    tokens_per_step = cfg.grad_accum * rt.world_size * cfg.batch_size * cfg.seq_len  # over all ranks

    t0 = time.time()
    with tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="train",
              disable=not rt.is_main) as bar:
        for step in bar:
            # Phi-3's two phases: the step alone decides the phase, so resume stays exact
            data = train_data if step < switch else phase2_data
            # 1.-2. micro-batches, clip, AdamW
            row = train_step(model, optimizer, data, cfg, rt, step)
            row["phase"] = 1 if step < switch else 2
            done = row["step"] == cfg.max_steps
            # 3. validation loss and bits per byte on fixed windows (on the unwrapped model)
            # rank 0 alone logs (the other ranks return no val_loss to the CLI); under FSDP every
            # rank evaluates, since each forward all-gathers the layers' shards
            if (rt.is_main or sharded) and (row["step"] % cfg.eval_every == 0 or done):
                ev = evaluate(raw_model, val_data, cfg, rt)
                row.update(ev if rt.is_main else {})
            row["tokens_per_s"] = tokens_per_step * (row["step"] - start) / (time.time() - t0)
            if rt.is_main and (row["step"] % cfg.log_every == 0 or "val_loss" in row or done):
                metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", **({"val": f"{row['val_loss']:.3f}"}
                                                           if "val_loss" in row else {}))
            # 4. an atomic checkpoint first, then metrics.jsonl: the log never lists a step no checkpoint holds
            # (a killed run resumes from the checkpoint and read_metrics drops any rows past it)
            if row["step"] % cfg.ckpt_every == 0 or done:
                _save(ckpt_dir, raw_model, optimizer, tokenizer, cfg, row["step"], rt, names)
                if rt.is_main:
                    write_metrics(metrics, out_dir, train_data.info["unigram_entropy"])
                rt.barrier()  # no rank runs ahead of a checkpoint it might need
            if on_step is not None:
                on_step(row["step"], row)
    final = next((m for m in reversed(metrics) if "val_loss" in m), {})  # the last evaluated row
    return {"step": cfg.max_steps, "checkpoint": str(ckpt_dir), "params": raw_model.num_params(),
            "phase2_start": switch if phase2_data is not None else None,
            "unigram_entropy": train_data.info["unigram_entropy"], **final}
