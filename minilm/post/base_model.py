"""The model a post-training stage starts from: a checkpoint, with LoRA adapters when asked.

    model, tokenizer = init_model(cfg, device)      # cfg.init (+ LoRA of rank cfg.lora_r > 0)
    add_lora(cfg, hydra.lm)                          # adapters on a model already loaded

`PostConfig` holds the fields every post-training stage shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from minilm import MinilmError, lora
from minilm.checkpoint import load_checkpoint

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
