"""A memory plan: what one GPU must hold to train a model, known before anything is allocated.

    from minilm.memory import plan_memory
    plan = plan_memory(get_preset("phi3-mini"), batch_size=1, seq_len=4096, dtype="bf16", world=8, fsdp=True)
    print(plan.table())
    minilm memory --preset phi3-mini --seq-len 4096 --world 8 --fsdp --lora-r 16   # the same, as a command
    minilm sft --dry-run            # a stage's config, then its plan

Every term comes from the model itself, built on the `meta` device (shapes, no storage):
  weights      every parameter in fp32, the master copy; frozen copies (DPO's reference) in the
               compute dtype. FSDP shards both over `world` GPUs; DDP keeps a full copy on each.
  gradients    one fp32 value per trainable parameter (sharded by FSDP)
  optimizer    AdamW's two fp32 moments per trainable parameter (sharded by FSDP)
  activations  what autograd saves for backward in one micro-batch: the forward runs on meta
               tensors and `saved_tensors_hooks` adds up every saved storage that is not a
               parameter (attention as minilm's fused kernel saves it: q, k, v, output and
               log-sum-exp, through the kernels' fake implementations; without built kernels the
               reference's score matrices are counted). With activation checkpointing only each
               layer's input is kept, plus one layer recomputed during backward.
  loss         the logits the forward returns plus the logit-sized gradients of the cross-entropy's
               backward: two float32 ones on PyTorch's path, one in the compute dtype with the fused
               kernel (csrc/loss/, MINILM_FUSED_LOSS=1): (B, T, V) tensors, the biggest transients
  kv cache     keys and values for generation (PPO, DNO, LTC rollouts), compute dtype
Peaks on CPU (fp32) are within about 20% of the plan (tests/test_memory.py; benchmarks print both).
Deviation from a real run: allocator fragmentation, CUDA context (~0.5 GiB) and temporary buffers
of the backward pass are not in the plan; leave 10-20% headroom.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from minilm.config import ModelConfig
from minilm.lora import apply_lora
from minilm.model import Phi3
from minilm.ops import loss as cross_entropy_kernel

BYTES = {"fp32": 4, "bf16": 2}
GIB = 2 ** 30


@dataclass
class MemoryPlan:
    """Bytes per GPU, by what holds them."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    kv_cache: float
    params: int
    trainable: int
    setting: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss + self.kv_cache

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("activations", self.activations), ("loss buffers", self.loss), ("kv cache", self.kv_cache),
                ("total per GPU", self.total)]
        lines = [f"memory plan: {self.setting}", f"  {self.params:,} parameters, {self.trainable:,} trainable"]
        lines += [f"  {name:<20s}{value / GIB:10.3f} GiB" for name, value in rows]
        return "\n".join(lines)


def _meta_model(cfg: ModelConfig, lora_r: int, dtype: torch.dtype) -> Phi3:
    with torch.device("meta"):
        model = Phi3(cfg).to(dtype)
        if lora_r:
            apply_lora(model, r=lora_r)
    return model


def activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, dtype: str = "fp32", lora_r: int = 0,
                     checkpointing: bool = False) -> float:
    """Bytes autograd saves for backward in one micro-batch (parameters excluded).

    With checkpointing each decoder layer keeps only its input (B, T, D); during backward one
    layer at a time is recomputed, so the largest layer's own activations come back once."""
    model = _meta_model(cfg, lora_r, torch.float32 if dtype == "fp32" else torch.bfloat16)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}      # storage -> (bytes, layer that saved it; -1 outside layers)
    layer = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), layer[0])
        return t

    hooks = []
    for i, block in enumerate(model.model.layers):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: layer.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: layer.__setitem__(0, -1)))
    idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    for h in hooks:
        h.remove()
    whole = sum(b for b, _ in saved.values())
    if not checkpointing:
        return whole
    per_layer = [sum(b for b, l in saved.values() if l == i) for i in range(cfg.n_layer)]
    inputs = cfg.n_layer * batch_size * seq_len * cfg.d_model * BYTES[dtype]
    return whole - sum(per_layer) + inputs + max(per_layer)


def plan_memory(cfg: ModelConfig, batch_size: int, seq_len: int, *, dtype: str = "bf16", lora_r: int = 0,
                world: int = 1, fsdp: bool = False, checkpointing: bool = False, frozen_copies: int = 0,
                kv_batch: int = 0, kv_len: int = 0) -> MemoryPlan:
    """The per-GPU plan for training `cfg` on micro-batches of batch_size x seq_len per GPU."""
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {dtype!r}")
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
    model = _meta_model(cfg, lora_r, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = world if fsdp else 1
    weights = (params * 4 + frozen_copies * params * BYTES[dtype]) / shard
    activations = activation_bytes(cfg, batch_size, seq_len, dtype, lora_r, checkpointing)
    loss_grads = BYTES[dtype] if cross_entropy_kernel.USE_KERNEL else 2 * 4
    loss = batch_size * seq_len * cfg.vocab_size * (BYTES[dtype] + loss_grads)
    kv = 2 * cfg.n_layer * kv_batch * kv_len * cfg.n_kv_head * cfg.head_dim * BYTES[dtype]
    setting = (f"batch {batch_size} x seq {seq_len}, {dtype}, {'LoRA r=' + str(lora_r) if lora_r else 'full'}, "
               f"{world} GPU{'s' if world > 1 else ''} ({'FSDP' if fsdp else 'DDP' if world > 1 else 'one device'})"
               f"{', activation checkpointing' if checkpointing else ''}")
    return MemoryPlan(weights, trainable * 4 / shard, 2 * trainable * 4 / shard, activations, loss, kv,
                      params, trainable, setting)


def plan_for_stage(cfg, model_cfg: ModelConfig, world: int = 1) -> MemoryPlan:
    """The plan of one stage config (pretraining or post-training) on `world` GPUs.

    Batch and sequence are the stage's own (batch_size x seq_len or max_len); a full-parameter DPO
    or DNO also holds its frozen reference; sampling stages (PPO, DNO, LTC) hold a KV cache for a
    batch of rollouts. `dtype` auto counts bf16, the compute dtype on GPUs."""
    seq = getattr(cfg, "seq_len", 0) or getattr(cfg, "max_len", 0) or model_cfg.max_seq_len
    lora_r = getattr(getattr(cfg, "lora", None), "r", 0)
    frozen = 1 if (hasattr(cfg, "beta") and not lora_r) else 0          # DPO, DNO: pi_ref
    sampling = hasattr(cfg, "sample") or hasattr(cfg, "episodes_per_iter")
    if hasattr(cfg, "grad_accum"):      # pretraining: batch_size is one micro-batch of one rank
        micro = cfg.batch_size
    else:                               # post-training: the step's batch over every rank's micro-batches
        micro = cfg.batch_size // max(1, getattr(cfg, "micro_batches", 0) or world)
    return plan_memory(model_cfg, max(1, micro), min(seq, model_cfg.max_seq_len),
                       dtype="fp32" if getattr(cfg, "dtype", "auto") == "fp32" else "bf16", lora_r=lora_r,
                       world=world, fsdp=getattr(cfg, "fsdp", False) and world > 1,
                       checkpointing=getattr(cfg, "activation_checkpointing", False), frozen_copies=frozen,
                       kv_batch=cfg.batch_size if sampling else 0, kv_len=model_cfg.max_seq_len if sampling else 0)


def needs_fsdp(plan_ddp: MemoryPlan, gpu_bytes: float, headroom: float = 0.85) -> bool:
    """Shard when a DDP replica would fill more than `headroom` of one GPU (the speedrun's gpu choice)."""
    return plan_ddp.total > headroom * gpu_bytes
