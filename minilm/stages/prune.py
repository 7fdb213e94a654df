"""The pruning stage: fine-tune while FFN neurons are removed on a schedule (lesson 11).

    minilm prune --init runs/sft-tiny/checkpoint --method gum --sparsity 0.5 --out-dir runs/prune-gum
    minilm prune --init runs/sft-tiny/checkpoint --method random --sparsity 0.5 --distill

    result = run_prune(prune_config("tiny", method="movement", out_dir="runs/prune-mvp"))
    result["after"]["heldout_loss"], result["redundancy_after"]["redundancy"]

The task is the chat SFT data (minilm/post/sft.py) from the SFT checkpoint, its loss on the
assistant tokens; the held-out loss separates methods at this scale (lesson 11 says why).
  1. load cfg.init (the student) and, with --distill, a frozen copy (the teacher);
  2. wrap the student in `PrunedLM`: per-layer masks on the FFN activations, recomputed before
     every step from the method's scores at the density of `SparsitySchedule` (cubic);
     movement/GUM scores are parameters trained through a straight-through Top-v mask;
  3. measure held-out loss and redundancy of the dense model (before);
  4. train in run_loop: task loss [+ distillation] [+ GUM's uniqueness penalty];
  5. fix the final masks, zero the pruned neurons (out_dir/masked, an ordinary checkpoint) and
     write the physically smaller model (minilm/prune/compact.py) to out_dir/compact;
  6. measure again (after); write out_dir/prune.json.

Deviations from the paper (arXiv 2302.03773): tiny model and data, one seed; our own GUM
regulariser and weight (minilm/prune/scores.py); learned-score masks act through act * mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minilm.checkpoint import save_checkpoint
from minilm.config import ConfigError, Validated, from_preset
from minilm.loop import OptimConfig, run_loop
from minilm.model import set_neuron_masks
from minilm.post.base_model import init_model
from minilm.post.chat import collate
from minilm.post.oracles import AnswerOracle
from minilm.post.sft import evaluate_chat, make_batch_fn, render_examples, sft_data
from minilm.prune import scores as S
from minilm.prune.compact import compact_model
from minilm.prune.redundancy import NeuronMasker, redundancy_report
from minilm.prune.schedule import SparsitySchedule, distill_loss
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import write_json

METHODS = ("magnitude", "random", "movement", "gum")
LEARNED = ("movement", "gum")


@dataclass
class PruneConfig(Validated):
    out_dir: str = "runs/prune-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    max_steps: int = 150            # optimizer steps
    batch_size: int = 16            # examples per step
    eval_every: int = 50            # held-out evaluation every N steps
    ckpt_every: int = 50            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    method: str = "gum"             # magnitude, random, movement, gum
    sparsity: float = 0.5           # fraction of FFN neurons removed at the end (0: dense fine-tune)
    ranking: str = "auto"           # local, global, or auto (global for gum, local otherwise, as the paper)
    prune_warmup: int = 15          # dense steps before the cubic ramp (movement scores learn here)
    prune_final: int = 40           # steps at the final sparsity (recovery)
    mask_every: int = 5             # the density changes every mask_every steps
    distill: bool = False           # KD from the unpruned model
    distill_alpha: float = 0.5      # loss = (1 - a) * task + a * KD
    distill_temperature: float = 2.0
    gum_weight: float = 0.5         # weight of GUM's uniqueness penalty (our choice; see scores.py)
    gum_tokens: int = 256           # tokens per layer the penalty looks at (every k-th real token)
    sources: str = "dictionary,ops1,ops2,ops3,ops4,units,word"  # held-out prompts (data_prep/instructions.py)
    n_train: int = 4000
    n_eval: int = 200
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 192
    chat_eval: bool = False         # also judge greedy replies at the end (slow-ish, noisy at this size)
    max_new_tokens: int = 96        # reply budget of the greedy judgement (worked replies: 15-90 tokens)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity} (0.5 removes half the neurons)")
        if self.ranking not in ("auto", "local", "global"):
            raise ConfigError(f"--ranking must be local, global or auto, got {self.ranking!r}")


PRUNE_PRESETS = {
    "tiny": dict(),  # ~1M-param SFT model, 2 CPU cores, ~1 minute
    "ci": dict(max_steps=30, prune_warmup=5, prune_final=10, n_train=400, n_eval=32, eval_every=30,
               ckpt_every=30),
    "gpu": dict(max_steps=600, n_train=20000),
}
PRUNE_PRESETS["laptop"] = dict(max_steps=120, prune_final=30)   # the speedrun's 20 minutes
# the fields `minilm prune --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "method", "sparsity", "ranking", "max_steps", "batch_size", "lr",
         "prune_warmup", "prune_final", "mask_every", "distill", "gum_weight", "n_train", "n_eval",
         "eval_every", "ckpt_every", "chat_eval", "seed", "device", "dtype", "resume")


def prune_config(preset: str = "tiny", **overrides) -> PruneConfig:
    return from_preset(PruneConfig, PRUNE_PRESETS, preset, "prune", **overrides)


def global_ranking(cfg: PruneConfig) -> bool:
    return cfg.ranking == "global" or (cfg.ranking == "auto" and cfg.method == "gum")


class PrunedLM(nn.Module):
    """A Phi3 whose FFN neurons are masked (`set_neuron_masks`) by masks chosen from `method`'s scores.

    For movement and GUM `scores` holds one learned score per neuron (init 0; trained through
    the straight-through mask, which takes MLP's differentiable act * mask path); magnitude reads
    the current weights and random uses fixed seeded scores, and their plain 0/1 masks take the
    `ops.masked_ffn` path that skips pruned neurons. `set_density(d)` recomputes the masks.
    For GUM a `NeuronMasker` (record only) keeps each layer's masked activations for the penalty.
    """

    def __init__(self, lm, method: str, global_rank: bool, seed: int = 0):
        super().__init__()
        self.lm, self.method, self.global_rank = lm, method, global_rank
        widths = [layer.mlp.down_proj.weight.shape[1] for layer in lm.model.layers]  # F_l per layer
        # (F_l,) learned scores per layer (movement, gum): trainable parameters beside the model's own
        self.scores = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in widths]
                                       if method in LEARNED else [])
        self._random = [S.random_scores(w, seed, i) for i, w in enumerate(widths)]  # fixed by (seed, layer)
        self.recorder = NeuronMasker(lm, record=True) if method == "gum" else None
        self.masks: list = [None] * len(widths)  # (F_l,) 0/1 per layer; None: dense
        self.density = 1.0

    def current_scores(self) -> list[torch.Tensor]:
        if self.method in LEARNED:
            return list(self.scores)
        if self.method == "magnitude":
            return [S.magnitude_scores(layer.mlp) for layer in self.lm.model.layers]  # from the current weights
        return self._random

    def hard_masks(self, density: float | None = None) -> list[torch.Tensor]:
        density = self.density if density is None else density
        # keep the top `density` of the neurons by score, per layer (local) or over all layers (global)
        return [m.to(self.lm.lm_head.weight.device)
                for m in S.masks_from_scores(self.current_scores(), density, self.global_rank)]

    def set_density(self, density: float) -> None:
        self.density = density
        if density >= 1.0 and self.method not in LEARNED:
            self.masks = [None] * len(self.masks)                 # dense: nothing to mask
        else:
            hard = self.hard_masks(density)
            if self.method in LEARNED:
                # value: the 0/1 mask; gradient: straight to the scores, so the scores learn through Top-v
                hard = [S.straight_through(s, h) for s, h in zip(self.scores, hard)]
            self.masks = hard
        set_neuron_masks(self.lm, self.masks)  # the MLPs multiply act by mask

    def release(self) -> None:
        """Drop the masks and hooks, leaving the plain model."""
        set_neuron_masks(self.lm, [None] * len(self.masks))
        if self.recorder is not None:
            self.recorder.remove()

    def forward(self, tokens, targets=None, attention_mask=None):
        return self.lm(tokens, targets, attention_mask=attention_mask)


def gum_penalty(model: PrunedLM, attention_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Mean over layers of `uniqueness_penalty` on every k-th real token's (masked) activations."""
    valid = attention_mask.bool().flatten()  # (B * T,)
    terms = []
    for acts, mask in zip(model.recorder.acts, model.masks):
        a = acts.flatten(0, 1)[valid]                          # (N, F) real tokens
        a = a[:: max(1, a.shape[0] // n_tokens)][:n_tokens]  # (<= n_tokens, F): every k-th token
        terms.append(S.uniqueness_penalty(a, mask))
    return torch.stack(terms).mean()


def make_loss_fn(cfg: PruneConfig, sched: SparsitySchedule, teacher=None):
    """loss_fn(model, batch) for run_loop: set the step's masks, task loss [+ KD] [+ GUM penalty]."""
    def loss_fn(model: PrunedLM, batch: dict):
        # the density is a pure function of the step (batch["step"]), so a resumed run masks the same neurons
        model.set_density(sched.density(batch["step"]))
        logits, loss = model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])  # (B, T, V)
        metrics = {"density": model.density, "task_loss": loss.item()}
        if teacher is not None:
            with torch.no_grad():
                # the dense teacher is a fixed target: no graph through it
                t_logits, _ = teacher(batch["tokens"], attention_mask=batch["attention_mask"])
            kd = distill_loss(logits, t_logits, batch["targets"] != -100, cfg.distill_temperature)  # on target tokens
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
            metrics["kd"] = kd.item()
        if model.method == "gum" and cfg.gum_weight > 0:
            penalty = gum_penalty(model, batch["attention_mask"], cfg.gum_tokens)
            loss = loss + cfg.gum_weight * penalty
            metrics["uniqueness_penalty"] = penalty.item()
        return loss, metrics
    return loss_fn


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> dict:
    """Mean next-token loss over the held-out assistant tokens (token-weighted), and its perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        n = int((b["targets"] != -100).sum())  # assistant tokens: the loss is their mean
        _, loss = model(b["tokens"].to(device), b["targets"].to(device),
                        attention_mask=b["attention_mask"].to(device))
        total, count = total + loss.item() * n, count + n  # token-weighted across batches
    mean = total / max(1, count)
    return {"heldout_loss": mean, "heldout_ppl": float(torch.tensor(mean).exp())}


def zero_pruned(lm, masks: list[torch.Tensor]) -> None:
    """Zero each pruned neuron's gate row, up row and down column: the dense model now computes
    exactly what the masked one does (silu(0) * 0 = 0 and a zero column adds nothing)."""
    with torch.no_grad():
        for layer, mask in zip(lm.model.layers, masks):
            gate, up, down = S.neuron_slices(layer.mlp)
            drop = mask.to(gate.device) == 0  # (F,) bool
            gate[drop] = 0.0
            up[drop] = 0.0
            down[:, drop] = 0.0


def _compact(lm, masks, tokenizer, directory: Path, meta: dict, batches) -> dict:
    """Physically remove the pruned neurons (minilm/prune/compact.py); save it and measure it."""
    small = compact_model(lm, masks)
    save_checkpoint(directory, small, tokenizer, meta={**meta, "stage": "prune-compact"})
    return {"path": str(directory), "params": small.num_params(), **heldout_loss(small, batches)}


@one_writer
def run_prune(cfg: PruneConfig, on_step=None) -> dict:
    """Fine-tune cfg.init while pruning cfg.sparsity of its FFN neurons with cfg.method."""
    check_settings(cfg, "prune")   # a rerun into this out_dir must have the same settings
    rt = setup_runtime(cfg.device, cfg.dtype)
    lm, tokenizer = init_model(cfg.init, None, rt.device)                                    # 1.
    teacher = None
    if cfg.distill:
        teacher, _ = init_model(cfg.init, None, rt.device)  # a second, independent copy of cfg.init
        teacher.eval().requires_grad_(False)
    train, heldout, _ = sft_data(cfg)
    examples = render_examples(tokenizer, train, cfg.max_len)
    held = render_examples(tokenizer, heldout, cfg.max_len)
    # fixed held-out batches of (<= 64, T) tokens/targets/attention_mask, the same before and after
    batches = [collate(held[i:i + 64], tokenizer.eot_id, cfg.max_len) for i in range(0, len(held), 64)]
    base_fn = make_batch_fn(examples, cfg.batch_size, cfg.seed, tokenizer.eot_id, cfg.max_len)
    # density: 1 for prune_warmup steps, a cubic ramp down, then 1 - sparsity for the last prune_final steps
    sched = SparsitySchedule(1.0 - cfg.sparsity, cfg.max_steps, cfg.prune_warmup, cfg.prune_final,
                             cfg.mask_every)
    model = PrunedLM(lm, cfg.method, global_ranking(cfg), cfg.seed)               # 2.
    probe = batches[0]  # the redundancy report's tokens
    before = heldout_loss(model, batches)                                         # 3.
    red_before = redundancy_report(lm, probe)

    # the plain lm: the masks live in train_state (scores) and follow from the step on resume
    def save_fn(ckpt_dir, train_state, meta):
        save_checkpoint(ckpt_dir, lm, tokenizer, train_state,
                        {**meta, "method": cfg.method, "sparsity": cfg.sparsity, "before": before})

    # the step rides in the batch so loss_fn can set that step's masks
    summary = run_loop(cfg, model, lambda step: {**base_fn(step), "step": step},  # 4.
                       make_loss_fn(cfg, sched, teacher), lambda m: heldout_loss(m, batches),
                       save_fn, tokenizer, stage=f"prune-{cfg.method}", rt=rt, on_step=on_step)
    model.eval()
    last = model.masks             # the masks of the last step, if it ran at the final density
    if model.density != sched.final_density or any(m is None for m in last):
        last = model.hard_masks(sched.final_density)
    masks = [m.detach().cpu() for m in last]                                      # 5.
    model.release()
    # bake the masks into the weights: the plain dense lm now computes the pruned model
    zero_pruned(lm, masks)
    after = heldout_loss(lm, batches)  # the dense path, pruned weights zeroed
    set_neuron_masks(lm, [m.to(lm.lm_head.weight.device) for m in masks])       # the skipping kernel
    after["heldout_loss_kernel"] = heldout_loss(lm, batches)["heldout_loss"]
    set_neuron_masks(lm, [None] * len(masks))  # back to a plain model for saving
    meta = {"stage": "prune", "method": cfg.method, "sparsity": cfg.sparsity, "init": cfg.init,
            "ranking": "global" if model.global_rank else "local", "distill": cfg.distill,
            "densities": [float(m.mean()) for m in masks], **after}
    masked_dir = Path(cfg.out_dir) / "masked"
    save_checkpoint(masked_dir, lm, tokenizer, meta=meta,
                    extra={"prune": {f"mask_{i}": m for i, m in enumerate(masks)}})
    compact = _compact(lm, masks, tokenizer, Path(cfg.out_dir) / "compact", meta, batches)
    red_after = redundancy_report(lm, probe, masks)                               # 6.
    result = {**summary, "method": cfg.method, "sparsity": cfg.sparsity, "distill": cfg.distill,
              "ranking": meta["ranking"], "densities": meta["densities"], "before": before,
              "after": after, "redundancy_before": red_before, "redundancy_after": red_after,
              "masked_checkpoint": str(masked_dir), "compact": compact}
    if cfg.chat_eval:
        result["chat"] = evaluate_chat(lm, tokenizer, heldout, AnswerOracle(train + heldout),
                                       cfg.max_new_tokens)
    write_json(Path(cfg.out_dir) / "prune.json", result)
    return result
