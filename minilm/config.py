"""Model configuration: the `ModelConfig` dataclass and its named presets.

The fields are the Phi-3 hyper-parameters (arXiv 2404.14219, section 2), named so they map onto
Hugging Face's `Phi3Config` one to one (see `minilm/checkpoint.py` for the mapping):

    from minilm.config import get_preset
    cfg = get_preset("tiny")              # a ModelConfig
    cfg = get_preset("tiny", n_layer=6)   # a preset with fields overridden

Every preset says what hardware it is for and roughly what it reaches. The `phi3-*` presets are the
published shapes; build them on the `meta` device to count parameters without allocating memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minilm import MinilmError


class ConfigError(MinilmError, ValueError):
    """A configuration that cannot describe a model; the message says which field and why."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096       # >= the tokenizer's n_vocab (padded up to a multiple of 64 is fine)
    n_layer: int = 4
    n_head: int = 4              # query heads
    n_kv_head: int = 2           # key/value heads; n_head % n_kv_head == 0 (GQA; == n_head is MHA)
    d_model: int = 128
    d_ff: int = 384              # width of the gated MLP's hidden layer
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share token embedding and LM head (phi-3-mini does not)
    dropout: float = 0.0         # residual dropout; 0 for pretraining small models
    # FFN width of each layer after structured pruning (minilm/prune/compact.py); None: every layer
    # d_ff. d_ff stays the width before pruning; a layer may be pruned away entirely (width 0)
    d_ff_per_layer: tuple[int, ...] | None = None
    # each query sees at most the last `sliding_window` keys, itself included (phi-3-mini-4k: 2047);
    # None: the whole causal prefix
    sliding_window: int | None = None
    # LongRoPE (Phi-3's 128k models, arXiv 2402.13753): frequency i is divided by short_factor[i] up
    # to rope_original_max_len positions and by long_factor[i] beyond; 0: plain RoPE (lesson 01)
    rope_original_max_len: int = 0
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                              f"each head needs d_model / n_head dimensions")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                              f"grouped-query attention shares each k/v head among n_head/n_kv_head queries")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_ffn_widths()
        self._check_long_context()

    def _check_long_context(self):
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be None or a positive integer, got {self.sliding_window!r}")
        factors = (self.rope_short_factor, self.rope_long_factor)
        if not self.rope_original_max_len:
            if any(f is not None for f in factors):
                raise ConfigError("rope_short_factor/rope_long_factor need rope_original_max_len (LongRoPE)")
            return
        if any(f is None or len(f) != self.head_dim // 2 for f in factors):
            raise ConfigError(f"LongRoPE needs rope_short_factor and rope_long_factor of head_dim / 2 = "
                              f"{self.head_dim // 2} values each")
        self.rope_short_factor, self.rope_long_factor = (tuple(float(x) for x in f) for f in factors)
        if not 0 < self.rope_original_max_len <= self.max_seq_len:
            raise ConfigError(f"rope_original_max_len={self.rope_original_max_len} must be in "
                              f"(0, max_seq_len={self.max_seq_len}]")

    def _check_ffn_widths(self):
        widths = self.d_ff_per_layer
        if widths is None:
            return
        if not isinstance(widths, (tuple, list)):
            raise ConfigError(f"d_ff_per_layer must be None or one FFN width per layer, got {widths!r}")
        self.d_ff_per_layer = widths = tuple(widths)  # JSON gives a list
        if len(widths) != self.n_layer:
            raise ConfigError(f"d_ff_per_layer has {len(widths)} widths but n_layer={self.n_layer}; "
                              f"give one FFN width per layer")
        bad = [(i, w) for i, w in enumerate(widths) if isinstance(w, bool) or not isinstance(w, int) or w < 0]
        if bad:
            raise ConfigError(f"d_ff_per_layer must hold non-negative integers; layer {bad[0][0]} has "
                              f"{bad[0][1]!r}")

    def ffn_width(self, layer: int) -> int:
        """The FFN width (neurons) of layer `layer`: d_ff unless d_ff_per_layer says otherwise."""
        if not 0 <= layer < self.n_layer:
            raise ConfigError(f"layer {layer} out of range: the model has n_layer={self.n_layer}")
        return self.d_ff if self.d_ff_per_layer is None else self.d_ff_per_layer[layer]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}  # a typo in config.json fails loudly
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# name -> (fields, what it is for). Parameter counts are for the stated vocab.
PRESETS: dict[str, tuple[dict, str]] = {
    "tiny": (dict(vocab_size=2048, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384,
                  max_seq_len=256, tie_embeddings=True),
             "~1.05M params; 2 CPU cores, ~6.6 minutes under bf16; val loss 4.12 nats (unigram entropy 6.46)"),
    "small": (dict(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1408,
                   max_seq_len=512, tie_embeddings=True),
              "~27.8M params; hours on a laptop CPU, minutes on one GPU"),
    "phi3-mini": (dict(vocab_size=32064, n_layer=32, n_head=32, n_kv_head=32, d_model=3072,
                       d_ff=8192, max_seq_len=4096, tie_embeddings=False),
                  "phi-3-mini's published shape, 3,821,079,552 params; build on the meta device"),
    "phi3-small": (dict(vocab_size=100352, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                        d_ff=14336, max_seq_len=8192, tie_embeddings=False),
                   "phi-3-small's shape (GQA 4:1, cl100k vocab padded) with our gated-SiLU dense "
                   "layout; the real one uses GEGLU and blocksparse layers, so counts differ slightly"),
    "phi3-medium": (dict(vocab_size=32064, n_layer=40, n_head=40, n_kv_head=10, d_model=5120,
                         d_ff=17920, max_seq_len=4096, tie_embeddings=False),
                    "phi-3-medium's published shape (14B); build on the meta device"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` as a ModelConfig, with any fields in `overrides` replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields, _ = PRESETS[name]
    return ModelConfig(**{**fields, **overrides})


# ---- stage configs: every field checked when the config is made ---------------------------------
# One table of rules by field name, applied by `Validated.__post_init__` to every stage config and
# its nested configs, so the CLI, the speedrun and the Python API refuse the same bad values the
# same way, before any work starts (a ConfigError; the CLI prints it and exits 2).

def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


RULES = {   # field name -> (test, what the value must be)
    **{name: (lambda v: _int(v) and v >= 1, "a positive integer") for name in (
        "batch_size", "max_steps", "grad_accum", "eval_every", "ckpt_every", "log_every", "eval_batches",
        "iterations", "episodes_per_iter", "rollout_batch", "max_len", "max_new_tokens", "minibatch_size",
        "ppo_epochs", "samples", "text_batch_size", "text_seq_len", "mask_every")},
    **{name: (lambda v: _int(v) and v >= 0, "an integer >= 0") for name in (
        "warmup_steps", "seq_len", "il_steps", "chat_replay", "n_demos", "micro_batches")},
    **{name: (lambda v: _real(v) and v > 0, "a finite number > 0") for name in ("lr", "il_lr", "grad_clip", "beta")},
    **{name: (lambda v: _real(v) and v >= 0, "a finite number >= 0") for name in (
        "weight_decay", "temperature", "sft_weight", "text_mix", "ppo_coef", "ent_coef", "vf_coef", "kl_coef")},
    "min_lr_ratio": (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "top_p": (lambda v: v is None or (_real(v) and 0 < v <= 1), "a number in (0, 1]"),
    "top_k": (lambda v: v is None or (_int(v) and v >= 1), "None or an integer >= 1"),
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_real(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. 0.9,0.95"),
}


def check_values(**values) -> None:
    """Apply RULES to named values (command-line settings that are not a config dataclass)."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule and not rule[0](value):
            raise ConfigError(f"{name} must be {rule[1]}, got {value!r}")


class Validated:
    """Mixin for config dataclasses: check every field that RULES names, then the class's own
    `check()`, at construction, so a bad value is refused before a stage touches its out_dir."""

    def __post_init__(self):
        prefix = getattr(type(self), "PREFIX", "")
        for f in dataclasses.fields(self):
            rule = RULES.get(f.name)
            value = getattr(self, f.name)
            if rule and not rule[0](value):
                raise ConfigError(f"{prefix + f.name} must be {rule[1]}, got {value!r}")
        self.check()

    def check(self) -> None:
        """A stage's own rules (a choice among names, fields that constrain each other): raise ConfigError."""


# ---- stage configs: presets, and nested configs set by flat names --------------------------------
# A stage's config composes small dataclasses (minilm.loop.OptimConfig, minilm.lora.LoRAConfig,
# minilm.generate.SampleConfig). Presets, flags and --set name their fields flat: `lr` is
# cfg.optim.lr, `lora_r` is cfg.lora.r (a nested class's PREFIX comes first), so `--lr 3e-4` and
# `--lora-r 8` read as they always did.

def nested_configs(cls) -> dict[str, type]:
    """{field name: its dataclass type} for the fields of `cls` that are configs themselves."""
    hints = {f.name: f.default_factory for f in dataclasses.fields(cls)  # nested configs use factories
             if f.default_factory is not dataclasses.MISSING}
    out = {}
    for name, factory in hints.items():
        value = factory()  # an instance, to see its type
        if dataclasses.is_dataclass(value):
            out[name] = type(value)
    return out


def flat_fields(cls) -> list[tuple[str, dataclasses.Field]]:
    """(flat name, field) of every leaf field of a stage config, nested configs' fields included."""
    nested = nested_configs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in nested:
            prefix = getattr(nested[f.name], "PREFIX", "")  # LoRAConfig: "lora_"
            out += [(prefix + g.name, g) for g in dataclasses.fields(nested[f.name])]
        else:
            out.append((f.name, f))
    return out


def build(cls, **flat):
    """`cls` with its fields set from flat names: build(SFTConfig, lr=3e-4, lora_r=8, max_steps=10)
    sets cfg.optim.lr, cfg.lora.r and cfg.max_steps; every other field keeps its default. A nested
    config may also be passed whole (optim=OptimConfig(...)). An unknown name is a TypeError that
    lists the fields."""
    own = {f.name for f in dataclasses.fields(cls)}
    leaf_of = {}  # flat name of a nested field -> (the nested config's field, its own name)
    for name, kind in nested_configs(cls).items():
        prefix = getattr(kind, "PREFIX", "")
        leaf_of.update({prefix + g.name: (name, g.name) for g in dataclasses.fields(kind)})
    top, parts = {}, {}  # the stage's own fields; nested name -> {leaf: value}
    for key, value in flat.items():
        if key in own:
            top[key] = value
        elif key in leaf_of:
            name, leaf = leaf_of[key]
            parts.setdefault(name, {})[leaf] = value
        else:
            names = ", ".join(sorted(name for name, _ in flat_fields(cls)))
            raise TypeError(f"{cls.__name__} has no field {key!r}; its fields: {names}")
    cfg = cls(**top)
    for name, values in parts.items():  # on top of the stage's own defaults for that config
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **values))
    return cfg


def flatten(cfg) -> dict:
    """The flat view of a stage config: {flat name: value}, the names presets and flags use."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            prefix = getattr(type(value), "PREFIX", "")
            out.update({prefix + k: v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    return out


def from_preset(cls, presets: dict, preset: str, stage: str, **overrides):
    """A stage's config from its named preset, then `overrides` (flat names, see `build`)."""
    if preset not in presets:
        raise MinilmError(f"unknown {stage} preset {preset!r}; choose one of {', '.join(presets)}")
    return build(cls, **{**presets[preset], **overrides})  # overrides beat the preset


def override(cfg, **flat):
    """A copy of the stage config `cfg` with fields changed by their flat names (lr=, lora_r=, ...)."""
    return build(type(cfg), **{**flatten(cfg), **flat})  # a copy: cfg is not changed
