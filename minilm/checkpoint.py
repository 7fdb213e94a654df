"""Checkpoints: atomic save, checked load, exact resume, and Hugging Face Phi-3 export/import.

A checkpoint is a directory:

    config.json        {"format", "version", "model": ModelConfig, "tokenizer": {...}, "meta": {...}}
    model.safetensors  weights (model.pt when the safetensors package is absent)
    tokenizer.tiktoken + tokenizer.json    the tokenizer, see minilm/tokenizer.py (or only tokenizer.json,
                       Hugging Face's own, for Phi-3-mini's tokenizer: minilm/sp_tokenizer.py)
    train_state.pt     optimizer, step, RNG states: what `train` needs to resume exactly
    adapter_config.json + adapters.safetensors   LoRA adapters, when the model carries them
    NAME.safetensors   each `extra` state dict (e.g. heads.safetensors for reward/value heads)

A model with LoRA adapters (minilm/lora.py) is saved as its base weights, unmerged even if the
adapters are merged, under the usual names, plus the adapters beside them; loading rebuilds the
base and re-applies the adapters, active as they were saved.

It is written under a temporary name and renamed into place, so a crash at any instant leaves
either the previous complete checkpoint or the new one, never half of one. Loading checks every
parameter name and shape and says exactly what does not match.

`export_hf` writes a directory that `transformers.Phi3ForCausalLM.from_pretrained` loads;
`import_hf` reads one back. Parameter names are already HF's (see minilm/model.py). A pruned model
(per-layer FFN widths, minilm/prune/compact.py) is saved and loaded as it is; HF knows one FFN width,
so the export pads every layer to the widest with zero neurons, which add exactly 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilm import MinilmError
from minilm.config import ConfigError, ModelConfig
from minilm.lora import base_state_dict, lora_layers
from minilm.lora_io import load_adapters, write_adapters
from minilm.model import Phi3, get_neuron_masks
from minilm.sp_tokenizer import SentencePieceTokenizer
from minilm.tokenizer import Tokenizer, TokenizerError
from minilm.weights import (HAVE_SAFETENSORS, atomic_dir, load_safetensors, read_json, read_weights, recover,
                            write_weights)

FORMAT, VERSION = "minilm-checkpoint", 1
# config.json's tokenizer "kind" -> the class that loads it; a checkpoint without a kind is byte-level
TOKENIZERS = {cls.kind: cls for cls in (Tokenizer, SentencePieceTokenizer)}

@dataclass
class Checkpoint:
    model: Phi3
    config: ModelConfig
    tokenizer: object | None  # Tokenizer or SentencePieceTokenizer: TOKENIZERS[config "kind"]
    meta: dict
    train_state: dict | None
    path: Path
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> state dict


def _weights_to_save(model: Phi3, fold_adapters: bool = False) -> dict[str, torch.Tensor]:
    """The base weights by HF name: no LoRA tensors; active adapters folded into W if fold_adapters."""
    sd = {k: v.contiguous() for k, v in base_state_dict(model, fold=fold_adapters).items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    return sd


def load_weights(model: Phi3, state_dict: dict, source: str = "checkpoint") -> None:
    """Copy `state_dict` into `model`, first listing every missing, unexpected or mis-shaped name."""
    expected = _weights_to_save(model)  # names and shapes the model wants
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - {"lm_head.weight"})  # a tied lm_head may be saved
    shapes = [f"{k} is {tuple(state_dict[k].shape)}, the model's {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        def some(names):   # the first three, and how many more
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        found = ([f"missing {some(missing)}"] if missing else []) + \
                ([f"unexpected {some(unexpected)}"] if unexpected else []) + ([some(shapes)] if shapes else [])
        # one line: the weights and the model config disagree, so neither can be trusted on its own
        raise MinilmError(f"{source}: the weights do not fit the model its config describes ({'; '.join(found)}); "
                          f"use an earlier or the original checkpoint")
    model.load_state_dict({k: state_dict[k] for k in expected}, strict=False)  # non-strict: tied lm_head, LoRA


def _check_extra(extra: dict | None) -> dict:
    extra = extra or {}
    for name, sd in extra.items():
        if not (isinstance(name, str) and name.isidentifier()) or name in ("model", "adapters"):
            raise MinilmError(f"extra name {name!r} must be an identifier other than 'model' and "
                              f"'adapters' (it becomes NAME.safetensors)")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise MinilmError(f"extra[{name!r}] must be a dict of tensors, e.g. heads.state_dict()")
    return extra


def save_checkpoint(directory, model: Phi3, tokenizer=None, train_state: dict | None = None,
                    meta: dict | None = None, extra: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically; returns its path.

    extra: {name: {param: tensor}} saved as NAME.safetensors, e.g. {"heads": heads.state_dict()}.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    extra = _check_extra(extra)
    config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
              "tokenizer": None, "meta": meta or {}, "extra": sorted(extra)}
    if tokenizer is not None:
        config["tokenizer"] = {"kind": tokenizer.kind, "name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                               "fingerprint": tokenizer.fingerprint()}

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # tokenizer fingerprint, meta
        write_weights(_weights_to_save(model), tmp)  # base weights, adapters unmerged
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if lora_layers(model):
            write_adapters(model, tmp)
        for name, sd in extra.items():
            write_weights({k: v.detach().contiguous() for k, v in sd.items()}, tmp, stem=name)

    # write() fills a temporary directory; atomic_dir renames it into place only when complete
    return atomic_dir(Path(directory), write)


def read_config(directory) -> dict:
    """The parsed config.json of a checkpoint, with a clear error if it is not one."""
    directory = Path(directory)
    recover(directory)  # finishes a swap a crash interrupted
    path = directory / "config.json"
    if not path.exists():
        hint = " (it does not exist)" if not directory.exists() else ""
        raise MinilmError(f"{directory} is not a minilm checkpoint: no config.json{hint}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: json.JSONDecodeError
        raise MinilmError(f"{path} is corrupt ({e}); use an earlier checkpoint") from e
    if not isinstance(config, dict):
        raise MinilmError(f"{path} is corrupt (a JSON {type(config).__name__}, not an object); "
                          f"use an earlier checkpoint")
    if config.get("format") != FORMAT:
        raise MinilmError(f"{directory} is not a minilm checkpoint (format {config.get('format')!r}); "
                          f"for a Hugging Face model directory use `minilm import-hf`")
    return config


def read_train_state(path: Path) -> dict:
    """A train_state.pt (optimizer, step, RNG), or one clear error when it is truncated or corrupt."""
    try:
        # weights_only=False: it holds our own dicts (config, RNG states), written by save_checkpoint
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise MinilmError(f"{path} is truncated or corrupt ({type(e).__name__}); restore it, resume from "
                          f"an earlier checkpoint, or pass --no-resume to start over") from e


def has_train_state(directory) -> bool:
    """Whether `directory` holds a run to resume, after finishing a save a kill interrupted (a
    checkpoint caught between its two renames is not missing: it is put back first)."""
    directory = Path(directory)
    recover(directory)
    return (directory / "train_state.pt").exists()


def load_checkpoint(directory, device="cpu", with_train_state: bool = False) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`, checking config, tokenizer and weights.

    Saved LoRA adapters are re-applied to the model (base frozen, as `apply_lora` leaves it);
    `extra` state dicts come back in `Checkpoint.extra`.
    """
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise MinilmError(f"{directory}/config.json has an invalid model config: {e}") from e
    tokenizer = None
    if config.get("tokenizer"):
        kind = config["tokenizer"].get("kind", Tokenizer.kind)
        if kind not in TOKENIZERS:
            raise MinilmError(f"{directory}/config.json names tokenizer kind {kind!r}; this minilm reads "
                              f"{', '.join(TOKENIZERS)}. Upgrade minilm or use another checkpoint")
        try:
            tokenizer = TOKENIZERS[kind].load(directory)
        except TokenizerError as e:
            raise MinilmError(f"{directory}: {e}") from e
        # the files on disk must be the tokenizer the model was trained with
        if tokenizer.fingerprint() != config["tokenizer"]["fingerprint"]:
            raise MinilmError(f"{directory}: tokenizer files do not match config.json (fingerprint "
                              f"{tokenizer.fingerprint()} != {config['tokenizer']['fingerprint']})")
        if tokenizer.n_vocab > model_cfg.vocab_size:
            raise MinilmError(f"{directory}: tokenizer has {tokenizer.n_vocab} tokens but the model's "
                              f"vocab_size is {model_cfg.vocab_size}")
    model = Phi3(model_cfg)
    if tokenizer is not None and tokenizer.n_vocab < model_cfg.vocab_size:
        # ids past the tokenizer have no text: generation never samples them (minilm/generate.py)
        model.tokenizer_vocab = tokenizer.n_vocab
    # the base first; saved adapters are re-applied on top, active as saved
    load_weights(model, read_weights(directory), source=str(directory))
    if (directory / "adapter_config.json").exists():
        load_adapters(model, directory)
    extra = {name: read_weights(directory, names=(f"{name}.safetensors", f"{name}.pt"))
             for name in config.get("extra", [])}
    train_state = None
    if with_train_state and (directory / "train_state.pt").exists():
        train_state = read_train_state(directory / "train_state.pt")
    return Checkpoint(model.to(device), model_cfg, tokenizer, config.get("meta", {}), train_state,
                      directory, extra)


# ---- Hugging Face Phi-3 --------------------------------------------------------------------------

def hf_ffn_width(cfg: ModelConfig) -> int:
    """HF's one FFN width: the widest layer (at least 1 neuron, should every layer be pruned away)."""
    return max(1, *(cfg.d_ff_per_layer or (cfg.d_ff,)))


def _ffn_for_hf(model: Phi3, sd: dict) -> dict:
    """Pad each layer's FFN to `hf_ffn_width` with zero neurons (zero gate, up and down weights give
    silu(0) * 0 = 0, exactly); a model still carrying neuron masks has its pruned neurons zeroed."""
    width = hf_ffn_width(model.config)
    for i, mask in enumerate(get_neuron_masks(model)):
        gu_name, down_name = f"model.layers.{i}.mlp.gate_up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"
        gate_up, down = sd[gu_name], sd[down_name]  # (2w, D), (D, w)
        if mask is not None:
            m = mask.detach().to(down.dtype)  # (w,) 0/1
            gate_up, down = gate_up * torch.cat([m, m]).unsqueeze(1), down * m  # zero the pruned neurons
        pad = width - down.shape[1]
        if pad:
            gate, up = gate_up.chunk(2)  # (w, D) each
            zeros = gate_up.new_zeros(pad, gate_up.shape[1])
            gate_up = torch.cat([gate, zeros, up, zeros])  # (2 * width, D): HF splits in halves
            down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
        sd[gu_name], sd[down_name] = gate_up.contiguous(), down.contiguous()
    return sd


def hf_config(cfg: ModelConfig) -> dict:
    """Our ModelConfig as a `transformers.Phi3Config` dictionary."""
    longrope = None
    if cfg.rope_original_max_len:   # spelled as Phi-3-128k's own config.json spells it
        longrope = {"type": "longrope", "short_factor": list(cfg.rope_short_factor),
                    "long_factor": list(cfg.rope_long_factor)}
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": hf_ffn_width(cfg),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "max_position_embeddings": cfg.max_seq_len,
        "original_max_position_embeddings": cfg.rope_original_max_len or cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": longrope,
        "partial_rotary_factor": 1.0, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "resid_pdrop": cfg.dropout, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "sliding_window": cfg.sliding_window, "torch_dtype": "float32",
        # token ids belong to the tokenizer, not the model; HF's defaults (32000, Llama-2's) would
        # be out of range for a smaller vocab, and Phi3Model's nn.Embedding(padding_idx=) rejects that
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _longrope_from_hf(hf: dict, rope: dict, max_len: int) -> dict:
    """ModelConfig's LongRoPE fields from rope_parameters (transformers 5) or rope_scaling (config.json)."""
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not original or "short_factor" not in rope or "long_factor" not in rope:
        raise MinilmError("a longrope config needs short_factor, long_factor and original_max_position_embeddings")
    stretch = max_len / original
    implied = math.sqrt(1 + math.log(stretch) / math.log(original)) if stretch > 1 else 1.0
    if rope.get("factor") not in (None, stretch) or rope.get("attention_factor") not in (None, implied):
        raise MinilmError(f"longrope with factor {rope.get('factor')} / attention_factor {rope.get('attention_factor')} "
                          f"is not supported: minilm derives both from max_position_embeddings / original "
                          f"({stretch:g}, {implied:.6f}), as Phi-3's 128k models do")
    return {"rope_original_max_len": original, "rope_short_factor": tuple(rope["short_factor"]),
            "rope_long_factor": tuple(rope["long_factor"])}


def config_from_hf(hf: dict) -> ModelConfig:
    """Read a Phi3Config dictionary, refusing features our model does not implement."""
    if hf.get("model_type") != "phi3":
        raise MinilmError(f"model_type {hf.get('model_type')!r} is not phi3; minilm imports Phi-3 only")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    # "su" is what the first Phi-3-128k configs called LongRoPE
    if rope_type not in ("default", "longrope", "su") or partial != 1.0:
        raise MinilmError(f"RoPE type {rope_type!r} with partial_rotary_factor {partial} is not "
                          f"supported (minilm implements plain RoPE and Phi-3's LongRoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise MinilmError(f"hidden_act {hf['hidden_act']!r} is not supported; Phi-3 uses silu")
    max_seq_len = hf["max_position_embeddings"]
    longrope = _longrope_from_hf(hf, rope, max_seq_len) if rope_type != "default" else {}
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], max_seq_len=max_seq_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=hf.get("resid_pdrop", 0.0), sliding_window=hf.get("sliding_window"), **longrope)


def export_hf(model: Phi3, out_dir, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face Phi-3 directory (config.json + weights), atomically.

    Active LoRA adapters and neuron masks are folded into the exported weights, and per-layer FFN
    widths padded to one (see `_ffn_for_hf`): HF gets what the model computes now. With a
    tokenizer, tokenizer.json and tokenizer_config.json (chat template included) are written too,
    and generation stops at <|end|> or <|endoftext|>: `pipeline("text-generation", DIR)` works.
    """
    model = getattr(model, "module", model)
    config = hf_config(model.config)
    if tokenizer is not None:
        eot = tokenizer.eot_id
        stops = [tokenizer.special_tokens[s] for s in ("<|end|>", "<|endoftext|>") if s in tokenizer.special_tokens]
        config.update(eos_token_id=stops, pad_token_id=eot)

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        sd = _ffn_for_hf(model, _weights_to_save(model, fold_adapters=True))
        if HAVE_SAFETENSORS:
            write_weights(sd, tmp)  # model.safetensors
        else:
            torch.save(sd, tmp / "pytorch_model.bin")  # the name HF looks for without safetensors
        if tokenizer is not None:
            from minilm.hf_tokenizer import save_hf_tokenizer
            save_hf_tokenizer(tokenizer, tmp, max_length=model.config.max_seq_len)
            (tmp / "generation_config.json").write_text(json.dumps(
                {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}, indent=2))

    return atomic_dir(Path(out_dir), write)


def import_hf(hf_dir) -> Phi3:
    """Build our model from a Hugging Face Phi-3 directory (single-file or sharded safetensors).

    Its tokenizer (`minilm import-hf` reads it) is `minilm.hf_tokenizer.load_hf_tokenizer`'s."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise MinilmError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    model = Phi3(config_from_hf(read_json(hf_dir / "config.json", fix="download the model again")))
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index, fix="download the model again").get("weight_map", {}).values()))
        sd = {k: v for shard in shards for k, v in load_safetensors(hf_dir / shard).items()}
    else:
        sd = read_weights(hf_dir, names=("model.safetensors", "pytorch_model.bin"))
    load_weights(model, sd, source=str(hf_dir))
    return model
