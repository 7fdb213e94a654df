"""The model a post-training stage starts from: a checkpoint, with LoRA adapters when asked.

    model, tokenizer = init_model(cfg.init, cfg.lora, device)   # + LoRA when cfg.lora.r > 0
    add_lora(cfg.lora, hydra.lm)                                # adapters on a model already loaded

A stage config holds a `LoRAConfig` as `cfg.lora`; its flags are --lora-r, --lora-alpha, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from minilm import MinilmError, lora
from minilm.checkpoint import load_checkpoint
from minilm.config import Validated


@dataclass
class LoRAConfig(Validated):
    """LoRA adapters of a stage (Hu et al. 2021, arXiv 2106.09685); flags and presets name the fields
    lora_r, lora_alpha, lora_dropout, lora_targets."""
    PREFIX: ClassVar[str] = "lora_"
    r: int = 0                      # 0: no adapters (full fine-tune); > 0: rank, base frozen
    alpha: float = 16.0             # the update is scaled by alpha / r
    dropout: float = 0.0
    targets: str = "qkv_proj,o_proj,gate_up_proj,down_proj"  # comma-separated regexes over nn.Linear names


def lora_targets(cfg: LoRAConfig) -> tuple[str, ...]:
    """cfg.targets as a tuple of regexes (a comma-separated string or a sequence)."""
    targets = cfg.targets
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    targets = tuple(t for t in targets if t)
    if not targets:
        raise MinilmError("lora_targets is empty; name the layers to adapt, e.g. 'qkv_proj,o_proj'")
    return targets


def add_lora(cfg: LoRAConfig, model, adapter: str = "default") -> list[str]:
    """Wrap cfg's target layers of `model` with LoRA (rank cfg.r) and freeze the rest of it."""
    if cfg.r <= 0:
        raise MinilmError(f"lora_r must be > 0 to add LoRA adapters, got {cfg.r}")
    wrapped = lora.apply_lora(model, targets=lora_targets(cfg), r=cfg.r, alpha=cfg.alpha,
                              dropout=cfg.dropout, adapter=adapter, freeze_base=True)
    if not wrapped:
        raise MinilmError(f"lora_targets {cfg.targets!r} matched no nn.Linear layer of the model")
    return wrapped


def init_model(init: str, lora_cfg: LoRAConfig | None = None, device="cpu", adapter: str = "default"):
    """(model, tokenizer) from the checkpoint `init`, with LoRA added when lora_cfg.r > 0."""
    if not init:
        raise MinilmError("no starting checkpoint: pass --init DIR (e.g. runs/tiny/checkpoint, which `minilm train --preset tiny` writes)")
    ck = load_checkpoint(init, device=device)
    if ck.tokenizer is None:
        raise MinilmError(f"{init} has no tokenizer; post-training needs one to render chats")
    if lora.adapter_names(ck.model):
        # a LoRA stage's output (e.g. SFT with --lora-r): its adapters are part of the model this
        # stage starts from, so fold them in for good; "LoRA off" must then mean that model, and
        # a full fine-tune must find every weight trainable again
        lora.merge_and_unload(ck.model)
    if lora_cfg is not None and lora_cfg.r > 0:
        add_lora(lora_cfg, ck.model, adapter)
    return ck.model, ck.tokenizer
