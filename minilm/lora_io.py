"""LoRA adapters on disk: adapter_config.json + adapters.safetensors, saved alone or in a checkpoint.

    save_adapters(model, "runs/x/adapters")              # every adapter (or adapter="critic")
    load_adapters(fresh_model, "runs/x/adapters")        # wraps the same layers, loads A and B
    write_adapters(model, tmp_dir)                       # what save_checkpoint calls inside its temp dir

adapter_config.json records, per adapter, r, alpha, dropout, the target patterns and the exact
modules it wraps, plus which adapters are active; loading re-applies them to exactly those modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from minilm import MinilmError
from minilm.lora import (active_adapters, adapter_names, apply_lora, lora_layers, lora_state_dict, require_lora,
                         set_active_adapters)
from minilm.weights import atomic_dir, read_weights, write_weights

CONFIG_NAME, WEIGHTS_STEM, FORMAT = "adapter_config.json", "adapters", "minilm-lora"


def adapter_config(model, adapter: str | None = None) -> dict:
    """What adapter_config.json holds: per adapter r, alpha, dropout, targets and wrapped modules."""
    adapters = {}
    for name, m in lora_layers(model):
        for a, s in m.settings.items():
            if adapter is not None and a != adapter:
                continue
            entry = adapters.setdefault(a, {"r": s["r"], "alpha": s["alpha"], "dropout": s["dropout"],
                                            "targets": [], "modules": []})
            entry["targets"] += [t for t in s["targets"] if t not in entry["targets"]]
            entry["modules"].append(name)
    active = [a for a in active_adapters(model) if a in adapters]
    return {"format": FORMAT, "version": 1, "active": active, "adapters": adapters}


def write_adapters(model, directory: Path, adapter: str | None = None) -> None:
    """Write adapter_config.json and adapters.safetensors into an existing directory (not atomic)."""
    config = adapter_config(model, adapter)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    sd = {k: v.contiguous() for k, v in lora_state_dict(model, adapter).items()}
    write_weights(sd, directory, stem=WEIGHTS_STEM)


def save_adapters(model, directory, adapter: str | None = None) -> Path:
    """Write the adapters (one, or all) alone, atomically: adapter_config.json + adapters.safetensors."""
    if adapter is not None and adapter not in adapter_names(model):
        raise MinilmError(f"unknown adapter {adapter!r}; the model has {adapter_names(model)}")
    require_lora(model)
    return atomic_dir(Path(directory), lambda tmp: write_adapters(model, tmp, adapter))


def load_adapters(model, directory) -> list[str]:
    """Apply the adapters saved in `directory` to `model` and load their weights; returns their names.

    Layers that already carry an adapter of the same name and rank are reused (their values are
    overwritten). The active set becomes the saved one. The base is frozen as `apply_lora` does.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.exists():
        raise MinilmError(f"{directory} has no {CONFIG_NAME}; save adapters with save_adapters(model, dir)")
    try:
        config = json.loads(path.read_text())
        adapters = config["adapters"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:   # ValueError: bad JSON
        raise MinilmError(f"{path} is corrupt ({e}); save the adapters again") from e
    model = getattr(model, "module", model)  # DDP keeps the real model in .module
    if any(m.merged is not None for _, m in lora_layers(model)):
        raise MinilmError("the model's adapters are merged; call unmerge_lora(model) before load_adapters")
    for name, c in adapters.items():
        have = {n for n, m in lora_layers(model) if name in m.settings}
        todo = [n for n in c["modules"] if n not in have]
        if todo:  # exact names, so nothing else is wrapped
            apply_lora(model, [f"^{re.escape(n)}$" for n in todo], r=c["r"], alpha=c["alpha"],
                       dropout=c["dropout"], adapter=name)
        for n, m in lora_layers(model):
            if n in c["modules"]:
                m.settings[name]["targets"] = list(c["targets"])
    sd = read_weights(directory, names=(f"{WEIGHTS_STEM}.safetensors", f"{WEIGHTS_STEM}.pt"))
    expected = {k: v for k, v in lora_state_dict(model).items() if k.rsplit(".", 1)[-1] in adapters}
    problems = sorted(set(expected) ^ set(sd)) + [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape]
    if problems:
        raise MinilmError(f"{directory}: saved adapters do not fit the model: {', '.join(problems[:8])}")
    model.load_state_dict(sd, strict=False)
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    set_active_adapters(model, [a for a in config.get("active", []) if a in adapter_names(model)])
    return list(adapters)
