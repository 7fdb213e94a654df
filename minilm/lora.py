"""LoRA: low-rank adapters on any nn.Linear chosen by name (Hu et al. 2021, arXiv 2106.09685, sec. 4.1). A
wrapped layer computes

    y = W x + b + sum over active adapters a of  (alpha_a / r_a) * B_a A_a dropout_a(x)

with W (out, in) frozen, A_a (r, in) Gaussian with std 1/sqrt(in) and B_a (out, r) zero, so a new
adapter changes nothing until it is trained. `apply_lora` replaces each matched nn.Linear by a
`LoRALinear` that owns the *same* `weight`/`bias` Parameter objects, so state_dict names stay Hugging
Face's (model.layers.0.self_attn.qkv_proj.weight) and adapter tensors are the names containing
"lora_" (...qkv_proj.lora_A.actor, ...qkv_proj.lora_B.actor).

    names = apply_lora(model, targets=("qkv_proj", "o_proj"), r=8, alpha=16.0, adapter="actor")
    with lora_disabled(model): ref_logits, _ = model(idx)     # the base model, bit for bit
    with use_adapters(model, "critic"): values = ...            # only "critic" applies
    merge_lora(model); ...; unmerge_lora(model)                 # fold active adapters into W and back
    save_adapters(model, "runs/x/adapters")    # minilm/lora_io.py: adapters alone, on disk

Several named adapters may share one base (Hydra-PPO keeps "actor" and "critic" on one model); which
ones apply is a switch, no weight is copied. A newly applied adapter joins the active set.
While merged, the active set is frozen: switching adapters raises MinilmError (call `unmerge_lora`
first), because the merged deltas live inside W and could not be switched off without subtracting.

Deviations: the paper adapts only W_q and W_v; our default targets every projection of every layer
(fused qkv and gate/up included), as QLoRA (arXiv 2305.14314) found better. The paper's merge is exact in exact
arithmetic; here unmerge subtracts the same delta it added, so W comes back up to float rounding.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import MinilmError


DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LoRALinear(nn.Module):
    """An nn.Linear's weight and bias plus any number of named low-rank adapters."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: names, ties and optimizers keep working
        self.bias = base.bias
        self.lora_A = nn.ParameterDict()          # adapter -> (r, in)
        self.lora_B = nn.ParameterDict()          # adapter -> (out, r)
        self.lora_dropout = nn.ModuleDict()       # adapter -> Dropout on the adapter's input
        self.settings: dict[str, dict] = {}       # adapter -> {r, alpha, dropout, targets}
        self.active: tuple[str, ...] = ()         # the model-wide active set (names may be absent here)
        self.merged: tuple[str, ...] | None = None  # adapters folded into weight, None if unmerged
        self.train(base.training)  # an eval-mode model stays in eval mode (no adapter dropout)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, targets: list[str]):
        w = self.weight
        # A random and B zero: B A = 0, so a new adapter leaves the model exactly as it was
        a = torch.randn(r, self.in_features, device=w.device, dtype=w.dtype) / math.sqrt(self.in_features)
        self.lora_A[name] = nn.Parameter(a)  # (r, in)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.settings[name] = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}

    def scaling(self, name: str) -> float:
        # alpha / r, as the paper: with alpha fixed, a different r needs no new learning rate
        return self.settings[name]["alpha"] / self.settings[name]["r"]

    def delta(self, names) -> torch.Tensor:
        """sum of (alpha/r) B A over `names` present on this layer: (out, in), what merging adds to W."""
        d = torch.zeros_like(self.weight)
        for n in names:
            if n in self.settings:
                d += self.scaling(n) * (self.lora_B[n] @ self.lora_A[n])  # (out, r) @ (r, in)
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # exactly nn.Linear's computation
        if self.merged is not None:
            return y  # the active adapters are inside self.weight
        for n in self.active:
            if n in self.settings:
                # (.., in) -> (.., r) -> (.., out); never forms the (out, in) product B A
                h = F.linear(self.lora_dropout[n](x), self.lora_A[n])
                y = y + self.scaling(n) * F.linear(h, self.lora_B[n])
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={list(self.settings)}, active={list(self.active)}, merged={self.merged}")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the real model in .module


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)]


def require_lora(model) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise MinilmError("the model has no LoRA adapters; call minilm.lora.apply_lora(model, ...) first")
    return layers


def adapter_names(model) -> list[str]:
    """Every adapter present on the model, in the order they were first applied."""
    return list(dict.fromkeys(a for _, m in lora_layers(model) for a in m.settings))


def _check_args(targets, r, alpha, dropout, adapter) -> list[str]:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise MinilmError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise MinilmError(f"LoRA alpha must be > 0, got {alpha!r} (the update is scaled by alpha / r)")
    if not 0.0 <= dropout < 1.0:
        raise MinilmError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(adapter, str) or not _ADAPTER_NAME.match(adapter):
        raise MinilmError(f"adapter name {adapter!r} must be letters, digits and _ (a Python identifier)")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise MinilmError("LoRA targets is empty; give regexes of nn.Linear names, e.g. ('qkv_proj', 'o_proj')")
    for t in targets:
        try:
            re.compile(t)
        except re.error as e:
            raise MinilmError(f"LoRA target {t!r} is not a valid regex: {e}") from e
    return targets


def _match_targets(model, targets: list[str]) -> list[str]:
    """Names of the nn.Linear (or already wrapped) modules matching any target; an error per unmatched one."""
    linears = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, LoRALinear))]
    for t in targets:
        if not any(re.search(t, n) for n in linears):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            shown = ", ".join(linears[:12]) + (f" ... ({len(linears)} in all)" if len(linears) > 12 else "")
            raise MinilmError(f"LoRA target {t!r} matches no nn.Linear module. Linear layers are "
                              f"named {', '.join(leaves)}; full names: {shown}")
    return [n for n in linears if any(re.search(t, n) for t in targets)]


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, adapter: str = "default", freeze_base: bool = True) -> list[str]:
    """Add adapter `adapter` to every nn.Linear whose name matches a target regex; returns their names.

    The adapter becomes active (joining any already active ones). freeze_base=True sets
    requires_grad=False on every parameter whose name has no "lora_" (re-enable heads yourself).
    """
    targets = _check_args(targets, r, alpha, dropout, adapter)
    model = _unwrap(model)
    if any(m.merged is not None for _, m in lora_layers(model)):
        raise MinilmError("the model's adapters are merged; call unmerge_lora(model) before apply_lora")
    names = _match_targets(model, targets)
    for n in names:  # check everything before changing anything
        m = model.get_submodule(n)
        if isinstance(m, LoRALinear) and adapter in m.settings:
            raise MinilmError(f"adapter {adapter!r} is already on {n}; use another adapter name, "
                              f"or a target pattern that leaves {n} out")
    old = {a: s for _, m in lora_layers(model) for a, s in m.settings.items()}
    if adapter in old and (old[adapter]["r"], old[adapter]["alpha"], old[adapter]["dropout"]) != (r, alpha, dropout):
        raise MinilmError(f"adapter {adapter!r} already exists with r={old[adapter]['r']}, alpha="
                          f"{old[adapter]['alpha']}, dropout={old[adapter]['dropout']}; one adapter "
                          f"uses one setting, so pass those or choose another adapter name")
    active = tuple(active_adapters(model))  # kept: the new adapter joins them
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, LoRALinear):
            parent, _, leaf = n.rpartition(".")
            m = LoRALinear(m)  # shares m's weight/bias Parameters
            setattr(model.get_submodule(parent), leaf, m)
        m.add_adapter(adapter, r, alpha, dropout, targets)
    _set_active(model, active + (adapter,) if adapter not in active else active)
    if freeze_base:
        for pname, p in model.named_parameters():
            if "lora_" not in pname:  # the base and any heads
                p.requires_grad_(False)
    return names


def _set_active(model, names: tuple[str, ...]) -> None:
    for _, m in lora_layers(model):
        m.active = names


def active_adapters(model) -> list[str]:
    """The adapters that currently apply (the same on every layer), [] if none or no LoRA."""
    layers = lora_layers(model)
    return list(layers[0][1].active) if layers else []


def set_active_adapters(model, names) -> None:
    """Make exactly `names` (a name or a list; [] = none) apply. No weight is copied."""
    layers = require_lora(model)
    names = (names,) if isinstance(names, str) else tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise MinilmError(f"unknown adapter(s) {unknown}; the model has {adapter_names(model)}")
    merged = layers[0][1].merged
    if merged is not None and set(names) != set(merged):
        raise MinilmError(f"adapters {list(merged)} are merged into the weights, so the active set cannot "
                          f"change to {list(names)}; call unmerge_lora(model) first")
    _set_active(model, names)


@contextmanager
def use_adapters(model, *names: str):
    """Inside the block only `names` apply (none if no name is given); the previous set comes back after."""
    before = active_adapters(model)
    set_active_adapters(model, names)
    try:
        yield model
    finally:
        set_active_adapters(model, before)


def lora_disabled(model):
    """Context manager: no adapter applies, so the model computes exactly the base model."""
    return use_adapters(model)


def _refuse_tied(model, layers, doing: str) -> None:
    """A weight shared with another parameter (tied lm_head / embed_tokens) cannot absorb a delta."""
    # how many names point at each Parameter: more than one means tied
    uses = Counter(id(p) for _, p in _unwrap(model).named_parameters(remove_duplicate=False))
    for name, m in layers:
        if uses[id(m.weight)] > 1 and any(a in m.settings for a in m.active):
            raise MinilmError(f"{name}.weight is tied to another parameter (tied embeddings); {doing} "
                              f"would change that one too. Keep this model unmerged, or leave "
                              f"{name} out of the LoRA targets")


@torch.no_grad()
def merge_lora(model) -> None:
    """W <- W + sum (alpha/r) B A over the active adapters, on every wrapped layer (for fast inference)."""
    layers = require_lora(model)
    if layers[0][1].merged is not None:
        raise MinilmError(f"adapters {list(layers[0][1].merged)} are already merged; merging twice would "
                          f"add them twice. Call unmerge_lora(model) first")
    _refuse_tied(model, layers, "merging")
    for _, m in layers:
        m.weight += m.delta(m.active)  # in place: the same Parameter
        m.merged = m.active  # remembered: unmerge subtracts exactly this


@torch.no_grad()
def unmerge_lora(model) -> None:
    """Undo `merge_lora`: W <- W - the same sum (equal to the pre-merge W up to float rounding)."""
    layers = require_lora(model)
    if layers[0][1].merged is None:
        raise MinilmError("the adapters are not merged; nothing to unmerge")
    for _, m in layers:
        m.weight -= m.delta(m.merged)
        m.merged = None


@torch.no_grad()
def merge_and_unload(model) -> nn.Module:
    """Fold the active adapters into W for good and put plain nn.Linear layers back; returns `model`.

    The folded model is a new base: e.g. SFT with LoRA, then DPO whose reference (LoRA off) must be
    the SFT model, not the pre-SFT one. Inactive adapters are dropped. Every parameter gets
    requires_grad=True again, as in a model loaded without LoRA.
    """
    layers = require_lora(model)
    if layers[0][1].merged is None:
        merge_lora(model)
    root = _unwrap(model)
    for name, m in layers:
        # on meta: allocates nothing, its weight is replaced by the existing Parameter next
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias  # the same Parameters, now holding W + s B A
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent), leaf, linear.train(m.training))
    root.requires_grad_(True)  # as a freshly loaded model
    return model


def lora_parameters(model, adapter: str | None = None) -> list[nn.Parameter]:
    """The A and B parameters of `adapter` (all adapters if None), in named_parameters order."""
    if adapter is not None and adapter not in adapter_names(model):
        raise MinilmError(f"unknown adapter {adapter!r}; the model has {adapter_names(model)}")
    return [p for n, p in _unwrap(model).named_parameters() if _is_lora_key(n, adapter)]


def _is_lora_key(name: str, adapter: str | None = None) -> bool:
    parts = name.split(".")
    return (len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")  # ...lora_A.<adapter>
            and (adapter is None or parts[-1] == adapter))


def lora_state_dict(model, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """{state_dict name: tensor} of the adapter tensors (all adapters if `adapter` is None)."""
    if adapter is not None and adapter not in adapter_names(model):
        raise MinilmError(f"unknown adapter {adapter!r}; the model has {adapter_names(model)}")
    return {k: v.detach() for k, v in _unwrap(model).state_dict().items() if _is_lora_key(k, adapter)}


def base_state_dict(model, fold: bool = False) -> dict[str, torch.Tensor]:
    """The state dict without adapter tensors. Wrapped weights are the base W (fold=False; a merged
    layer is unmerged on the fly, the model is not changed) or W + the active adapters' deltas
    (fold=True: what the model computes now, for export to code that knows no LoRA)."""
    model = _unwrap(model)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not _is_lora_key(k)}
    if fold:
        _refuse_tied(model, lora_layers(model), "folding the adapters in")
    with torch.no_grad():
        for name, m in lora_layers(model):
            inside = m.merged or ()  # deltas now inside m.weight
            wanted = m.active if fold else ()  # deltas the saved weight should hold
            if set(inside) != set(wanted):
                sd[f"{name}.weight"] = m.weight - m.delta(inside) + m.delta(wanted)  # a new tensor; m.weight unchanged
    return sd

