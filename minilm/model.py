"""The Phi-3-style decoder-only transformer (Phi-3 technical report, arXiv 2404.14219, section 2).

    token ids -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits

    DecoderLayer:  x = x + o_proj(attention(rope(q), rope(k), v))    on input_layernorm(x)
                   x = x + down_proj(silu(gate) * up)                 on post_attention_layernorm(x)

with RMSNorm, rotary position embeddings ("rotate half" convention), one fused qkv projection,
grouped-query attention (n_kv_head <= n_head) and one fused gate/up projection. No biases.
Module and parameter names are exactly Hugging Face's `Phi3ForCausalLM` names, so a state dict
moves between the two without renaming (tests/test_hf_parity.py checks logits match).

    model = Phi3(get_preset("tiny"))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) int64
    h = model.hidden(idx)                          # (B, T, d_model), for reward/value heads

FFN neurons can be pruned per layer: `set_neuron_masks(model, masks)` (computed over the kept
neurons only, see `MLP`), or a config with `d_ff_per_layer` (a compacted model, minilm/prune/compact.py).

Decoding uses a `KVCache`; batches of prompts of different lengths are left-padded and pass an
`attention_mask` (B, S) of 1 for tokens and 0 for padding (positions then skip the padding).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from minilm import ops
from minilm.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for stability (as HF Phi-3 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # the same arithmetic as below, bit for bit (forward and backward, tests/test_model.py),
            # in one call instead of six: a decoding step at the tiny preset runs nine norms
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)   # unit rms per vector
        return self.weight * x32.to(x.dtype)     # back to the input dtype before the gain, as HF does


def rope_tables(head_dim: int, max_len: int, theta: float, factors=None,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim): angle pos * theta^(-2i/D), halves repeated.

    LongRoPE divides frequency i by factors[i] (stretching its wavelength) and multiplies cos and
    sin by `scale`, which sharpens attention's softmax back as the context grows."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # first half and second half share frequencies
    return angles.cos() * scale, angles.sin() * scale


def longrope_scale(cfg: ModelConfig) -> float:
    """sqrt(1 + ln(s) / ln(L)) for a context stretched s = max_seq_len / L times (L the original)."""
    stretch = cfg.max_seq_len / cfg.rope_original_max_len
    return math.sqrt(1 + math.log(stretch) / math.log(cfg.rope_original_max_len)) if stretch > 1 else 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair by its angle. x: (..., D), cos and sin broadcast to it: the model
    passes x (B, T, heads, D) with cos, sin (B, T, 1, D); (B, H, T, D) with (B, 1, T, D) works alike."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)   # "rotate half": (x1, x2) -> (-x2, x1)
    return (x * cos + rotated * sin).to(x.dtype)


def longrope_restart(cfg: ModelConfig, past: int, new: int) -> bool:
    """Must a KV cache of `past` positions be rebuilt before a call adding `new` ones?

    Under LongRoPE the cached keys were rotated with the short factors while the sequence fit the
    original context; once it passes that length every key needs the long ones. Like Hugging Face's
    Phi-3 generation, the caller then recomputes the whole sequence once (cache.length = 0)."""
    original = cfg.rope_original_max_len
    return bool(original) and 0 < past <= original < past + new


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated.

    k, v: (n_layer, B, n_kv_head, max_len, head_dim). `length` counts the positions filled; the
    model writes a step's new keys at [length, length + T) in every layer, then advances.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or config.max_seq_len
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H_kv, T, D) for `layer`; return all keys/values so far."""
        t, end = k.shape[2], self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} positions needed, {self.k.shape[3]} allocated")
        k_all, v_all = self.k[layer], self.v[layer]   # (B, H_kv, max_len, D) views
        k_all.narrow(2, self.length, t).copy_(k)
        v_all.narrow(2, self.length, t).copy_(v)
        # `length` advances once per forward, after the last layer (Phi3Model.forward); in k's dtype,
        # which differs from the cache's when FSDP computes in bf16 over fp32 weights (minilm/fsdp.py)
        return k_all.narrow(2, 0, end).to(k.dtype), v_all.narrow(2, 0, end).to(v.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # rows of qkv_proj: all query heads, then key heads, then value heads (HF's layout)
        self.qkv_proj = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.window = cfg.sliding_window

    def forward(self, x, cos, sin, layer_idx, kv_cache=None, mask=None):
        b, t, _ = x.shape
        qk_heads = self.n_head + self.n_kv_head
        qkv = self.qkv_proj(x).view(b, t, qk_heads + self.n_kv_head, self.head_dim)  # (B, T, H + 2 H_kv, D)
        # split, not two slices: its backward is one cat, where each slice's would zero-fill a qkv-sized gradient
        qk, v = qkv.split([qk_heads, self.n_kv_head], dim=2)
        qk = apply_rope(qk, cos, sin).transpose(1, 2)                      # queries and keys in one rotation
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)              # (B, H, T, D), (B, H_kv, T, D)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)                        # (B, H_kv, S, D): keys cached rotated
        # each k/v head serves H / H_kv query heads (GQA); the causal mask is bottom-right aligned.
        # `mask` (padding, from Phi3Model.forward) already holds causality and the window
        y = ops.attention(q, k, v, causal=True, window=self.window, mask=mask)   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    """Gated SiLU (SwiGLU): down(silu(gate(x)) * up(x)), with gate and up fused in one matmul.

    `neuron_mask` (None or a float (width,) tensor of 0/1, set with `set_neuron_masks`) prunes
    neurons (structured pruning, lesson 11): a mask that requires grad (straight-through
    pruning scores) multiplies the activations, so gradients reach it; any other mask goes to
    `ops.masked_ffn`, which skips the pruned neurons instead of multiplying them by zero (unless
    LoRA wraps the projections: then the activations are multiplied too).
    """

    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        width = cfg.d_ff if width is None else width
        with warnings.catch_warnings():  # width 0 (a layer pruned away): nothing to initialise
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.gate_up_proj = nn.Linear(cfg.d_model, 2 * width, bias=False)  # rows: gate, then up
            self.down_proj = nn.Linear(width, cfg.d_model, bias=False)
        self.register_buffer("neuron_mask", None, persistent=False)  # moves with .to(), not saved

    def forward(self, x):
        mask = self.neuron_mask
        # LoRA-wrapped projections (minilm/lora.py) compute more than .weight: keep them as modules
        plain = type(self.gate_up_proj) is nn.Linear and type(self.down_proj) is nn.Linear
        if mask is not None and not mask.requires_grad and plain:
            return ops.masked_ffn(x, self.gate_up_proj.weight, self.down_proj.weight, mask)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                  # (B, T, width) each
        act = F.silu(gate) * up                                           # a neuron's activation
        return self.down_proj(act if mask is None else act * mask.to(act.dtype))


def set_neuron_masks(model: nn.Module, masks: list[torch.Tensor | None]) -> None:
    """Give layer l's MLP the mask masks[l] (None: dense); one entry per layer, each (width_l,)."""
    layers = getattr(model, "module", model).model.layers
    if len(masks) != len(layers):
        raise ValueError(f"set_neuron_masks: got {len(masks)} masks for {len(layers)} layers; pass one "
                         f"per layer (None for a dense layer)")
    for i, (layer, mask) in enumerate(zip(layers, masks)):
        width = layer.mlp.down_proj.weight.shape[1]
        if mask is not None and (mask.dim() != 1 or mask.shape[0] != width or not mask.is_floating_point()):
            raise ValueError(f"set_neuron_masks: layer {i} needs a float mask of shape ({width},), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        layer.mlp.neuron_mask = mask


def get_neuron_masks(model: nn.Module) -> list[torch.Tensor | None]:
    """Each layer's neuron mask (None where the layer is dense)."""
    return [layer.mlp.neuron_mask for layer in getattr(model, "module", model).model.layers]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, cfg.ffn_width(layer_idx))
        # (Identity when it would drop nothing: a module call less per residual branch when decoding)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, self.layer_idx, kv_cache, mask)
        x = x + self.dropout(attn)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Phi3Model(nn.Module):
    """The trunk: embeddings, decoder layers, final norm. Named like HF's `Phi3Model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # activation checkpointing: in training, keep each layer's input only and recompute the layer
        # in backward (minilm/memory.py plans both ways); set by TrainConfig.activation_checkpointing
        self.checkpointing = False
        self.original_len = cfg.rope_original_max_len    # 0: plain RoPE, one table
        scale = longrope_scale(cfg) if self.original_len else 1.0
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_short_factor, scale)
        # not saved in checkpoints: they are a pure function of the config
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.original_len:   # LongRoPE's second table, for calls that reach past the original context
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_long_factor, scale)
            self.register_buffer("rope_cos_long", cos, persistent=False)
            self.register_buffer("rope_sin_long", sin, persistent=False)

    def forward(self, idx, kv_cache=None, attention_mask=None):
        b, t = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None:
            # left padding: a token's position counts only the real tokens before it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]  # (B, T)
        else:
            positions = torch.arange(past, past + t, device=idx.device).expand(b, t)
        if past + t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {past + t} tokens exceeds max_seq_len="
                             f"{self.rope_cos.shape[0]}; crop the input or raise max_seq_len")
        cos_table, sin_table = self.rope_cos, self.rope_sin
        # LongRoPE picks one table per call, as Hugging Face's Phi-3 does: the long factors once any
        # position of this call lies past the original context (cached keys keep their rotation)
        if self.original_len and int(positions.max()) + 1 > self.original_len:
            cos_table, sin_table = self.rope_cos_long, self.rope_sin_long
        cos = cos_table[positions].unsqueeze(2)  # (B, T, 1, D): broadcast over heads
        sin = sin_table[positions].unsqueeze(2)
        # padding: one mask for every layer (causality, padding, window), in the form each backend reads
        mask = None if attention_mask is None else ops.PaddingMask(
            t, past + t, attention_mask, self.layers[0].self_attn.window)
        x = self.embed_tokens(idx)                   # (B, T, d_model): the residual stream
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, kv_cache, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.length += t
        return self.norm(x)


class Phi3(nn.Module):
    """Phi-3 causal LM: `Phi3Model` trunk plus `lm_head`. Names match HF `Phi3ForCausalLM`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Phi3Model(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2's rule: scale the projections that write into the residual stream by 1/sqrt(2N),
        # so the stream's variance does not grow with depth at initialisation
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, kv_cache=None, attention_mask=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model): what the LM head and scalar heads read."""
        return self.model(idx, kv_cache=kv_cache, attention_mask=attention_mask)

    def forward(self, idx, targets=None, kv_cache=None, attention_mask=None):
        """Logits (B, T, vocab) and, given targets (B, T) with -100 for ignored tokens, the mean loss."""
        logits = self.lm_head(self.hidden(idx, kv_cache, attention_mask))
        loss = None
        if targets is not None:   # targets are already shifted: logits[:, t] predicts targets[:, t]
            # fused in csrc/loss/ with MINILM_FUSED_LOSS=1 (one read of the bf16 logits); PyTorch's path otherwise
            loss = ops.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once); optionally without the token embedding."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention's matmuls."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.lm_head.weight.numel()  # the LM head matmul still happens when tied
        attn = 6 * c.n_layer * c.n_head * c.head_dim * seq_len  # q k^T and p v, causal half x2
        return 6 * n + attn
