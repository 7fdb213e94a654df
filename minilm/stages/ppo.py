"""The PPO stage: one readable PPO step (1. roll out, 2. score, 3. advantages, 4. update) and run_ppo.

    minilm ppo --variant hydra --init runs/hydra-sft-tiny/checkpoint   # CPU, a few minutes (resumes)
    run_ppo(ppo_config("tiny", variant="lora", init="runs/sft-tiny/checkpoint",
                       reward_init="runs/reward-tiny/checkpoint"))
    row = ppo_step(models, prompts, cfg, optimizer, kl_ctl)             # one rollout batch

Standard RLHF PPO (Ziegler et al. 2019, arXiv 1909.08593; InstructGPT) as Hydra-RLHF (arXiv
2309.00754) runs it. The math is in minilm/post/ppo.py, the paper's four variants (ppo, lora,
hydra, jhydra) in minilm/post/ppo_models.py; this file orders the calls (lesson 08).
Choices and deviations, stated:
- Old log-probs and values are recomputed with one forward pass right after sampling, at the
  sampling temperature, so the first minibatch's ratio is 1 up to rounding.
- One AdamW over every trainable parameter (actor and critic), loss = policy + vf_coef * value
  - ent_coef * entropy, one grad-norm clip (DeepSpeed-Chat uses two optimizers). A "step" is one
  rollout batch; the lr schedule counts those.
- Laptop-sized defaults: beta = 0.05 fixed, LoRA rank 8 (the paper: beta 0.02, rank 128).
- The reward is the reward head (`--reward model`, as the paper) or AnswerOracle on the parsed
  reply (`--reward oracle`), for experiments with a known reward. The head is read where it was
  trained, on the "\\n" after <|end|>; a reply that did not end loses missing_end_penalty.
- Resume: every ckpt_every batches an atomic checkpoint with every trainable parameter, the
  optimizer, beta and the RNG; a restarted run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.instructions import instruction_examples
from minilm import MinilmError
from minilm.checkpoint import has_train_state, load_checkpoint, save_checkpoint
from minilm.config import Validated, from_preset
from minilm.generate import SampleConfig, generate
from minilm.loop import OptimConfig, lr_at, make_optimizer, optimizer_step, set_lr, trained_params
from minilm.lora import adapter_names, merge_and_unload, use_adapters
from minilm.plots import plot_ppo
from minilm.post.base_model import LoRAConfig
from minilm.post.chat import TurnClose, parse_reply, prompts_that_fit, render_prompt
from minilm.post.dpo import summarize
from minilm.post.oracles import AnswerOracle
from minilm.post.ppo import (entropy_from_logits, gae, kl_penalty, make_kl_controller, masked_mean, masked_whiten,
                             ppo_policy_loss, scaled_logprobs, shape_rewards, value_loss)
from minilm.post.ppo_models import VARIANTS, HydraModels, build_models, oracle_score_fn, reply_scores
from minilm.post.reward import load_reward_model
from minilm.resume import load_train_state, read_metrics, restore, rng_state, trainable_state, write_metrics
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import write_json


@dataclass
class PPOConfig(Validated):
    out_dir: str = "runs/ppo-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"          # ppo, lora: the SFT model; hydra, jhydra: Hydra-SFT
    max_steps: int = 40             # rollout batches
    batch_size: int = 16            # prompts per rollout
    eval_every: int = 10            # held-out evaluation every N steps
    ckpt_every: int = 10            # atomic checkpoint (and metrics.jsonl) every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8))  # ppo trains every weight; lora, hydra, jhydra use these adapters
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=80, temperature=1.0))
    reward_init: str = "runs/reward-tiny/checkpoint"  # the reward model (ppo, lora only)
    variant: str = "hydra"
    minibatch_size: int = 8
    ppo_epochs: int = 2             # passes over each rollout batch
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2               # PPO's epsilon for the policy ratio
    vf_clip: float = 0.2            # value clipping range (0: no clipping)
    vf_coef: float = 0.1
    ent_coef: float = 0.0           # entropy bonus weight (0: entropy is only logged)
    kl_coef: float = 0.05           # beta (initial beta when kl_target > 0)
    kl_target: float = 0.0          # > 0: adaptive controller (Ziegler et al.) aiming at this KL per sequence
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    score_clip: float = 5.0
    whiten_advantages: bool = True
    missing_end_penalty: float = 1.0  # subtracted from the reward model's score of a reply cut before <|end|>
    reward: str = "model"           # "model": the reward head; "oracle": AnswerOracle on the parsed reply
    sources: str = "dictionary,ops1,ops2,ops3,ops4,units,word"  # prompts (data_prep/instructions.py)
    n_prompts: int = 2000
    n_eval: int = 64                # held-out prompts judged greedily before/after and every eval_every
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)


PPO_PRESETS = {
    "tiny": dict(),  # ~1M-param models, 2 CPU cores, a few minutes per variant
    "ci": dict(max_steps=3, batch_size=8, minibatch_size=4, n_prompts=200, n_eval=8, max_new_tokens=16,
               eval_every=3, ckpt_every=3),
    "gpu": dict(max_steps=200, batch_size=64, minibatch_size=16, n_prompts=20000, n_eval=256),
}
PPO_PRESETS["laptop"] = dict(max_steps=24, eval_every=8, ckpt_every=8, n_eval=32)   # the speedrun's 20 minutes
# the fields `minilm ppo --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "reward_init", "variant", "out_dir", "max_steps", "batch_size", "minibatch_size",
         "ppo_epochs", "lr", "eval_every", "seed", "device", "resume", "lora_r",
         "max_new_tokens", "temperature", "clip", "kl_coef", "reward", "missing_end_penalty", "n_prompts",
         "n_eval")


def ppo_config(preset: str = "tiny", **overrides) -> PPOConfig:
    cfg = from_preset(PPOConfig, PPO_PRESETS, preset, "ppo", **overrides)
    if cfg.variant not in VARIANTS:
        raise MinilmError(f"unknown PPO variant {cfg.variant!r}; choose one of {', '.join(VARIANTS)}")
    if cfg.reward not in ("model", "oracle"):
        raise MinilmError(f"--reward must be 'model' or 'oracle', got {cfg.reward!r}")
    return cfg


@torch.no_grad()
def rollout_and_score(models, prompts: list[list[int]], cfg: PPOConfig, pad_id: int, stop_tokens,
                      kl_coef: float, score_fn=None, generator=None, close: TurnClose | None = None) -> dict:
    """Steps 1-3: sample, score, and turn scores into advantages. Returns the batch for the update.
    The reward: score_fn(rollout), or the reward model read as `reply_scores` reads it (needs close)."""
    # 1. roll out with the current actor
    with models.sampler() as policy:
        rollout = generate(policy, prompts, cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
                           top_p=cfg.sample.top_p, stop_tokens=stop_tokens, pad_id=pad_id, generator=generator)
    tokens, attn, mask = rollout.tokens, rollout.attention_mask, rollout.gen_mask  # (B, T) each, T = P + N
    # 2. score: old log-probs and values (one pass, as the update will see them), reference, reward
    logits, values = models.policy_and_values(tokens, attn)
    logprobs, _ = scaled_logprobs(logits, tokens, attn, cfg.sample.temperature)
    # the reference: the frozen start model (hydra, jhydra: the same weights with the adapters off)
    ref_logprobs, _ = scaled_logprobs(models.reference_logits(tokens, attn), tokens, attn, cfg.sample.temperature)
    scores = (score_fn(rollout) if score_fn is not None                  # (B,): one per reply
              else reply_scores(models, rollout, close, pad_id, cfg.missing_end_penalty))
    kl = kl_penalty(logprobs, ref_logprobs, mask, cfg.kl_estimator)  # (B, T), 0 off the reply
    # (B, T): -beta * KL on every generated token, + the clipped score on each reply's last token
    rewards = shape_rewards(scores.float(), kl, mask, kl_coef, cfg.score_clip)
    # 3. advantages over the generated tokens, whitened over the whole rollout batch
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)  # (B, T) each
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    # logged (and fed to the adaptive controller): k1 summed per reply, whichever estimator the penalty uses
    seq_kl = kl_penalty(logprobs, ref_logprobs, mask, "k1").sum(1)
    stats = {"score": scores.float().mean().item(), "kl": seq_kl.mean().item(),
             "length": mask.sum(1).float().mean().item(), "beta": kl_coef,
             "return": masked_mean(returns, mask).item()}
    return {"tokens": tokens, "attention_mask": attn, "mask": mask, "logprobs": logprobs, "values": values,
            "advantages": advantages, "returns": returns, "stats": stats, "rollout": rollout, "scores": scores}


def minibatch_loss(models, batch: dict, rows: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Policy + value (+ entropy) loss of the rows `rows` of a scored rollout batch."""
    tokens, attn, mask = batch["tokens"][rows], batch["attention_mask"][rows], batch["mask"][rows]  # (b, T)
    # (b, T, V) logits and (b, T) values, now with gradients; old log-probs and advantages are constants
    logits, values = models.policy_and_values(tokens, attn)
    logprobs, logits = scaled_logprobs(logits, tokens, attn, cfg.sample.temperature)
    old_logprobs, advantages = batch["logprobs"][rows], batch["advantages"][rows]
    pg_loss, pg = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip)
    vf_loss, vf = value_loss(values, batch["values"][rows], batch["returns"][rows], mask, cfg.vf_clip or None)
    # entropy needs a graph only when it is in the loss; otherwise it is just logged
    with torch.set_grad_enabled(cfg.ent_coef > 0 and torch.is_grad_enabled()):
        entropy = masked_mean(entropy_from_logits(logits), mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
    return loss, {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "entropy": entropy.item(), **pg, **vf}


def ppo_step(models, prompts: list[list[int]], cfg: PPOConfig, optimizer, kl_ctl, step: int = 0,
             pad_id: int = 0, stop_tokens=(), score_fn=None, generator=None, close: TurnClose | None = None) -> dict:
    """One PPO iteration: 1. roll out, 2. score, 3. advantages, 4. update (epochs x minibatches).

    score_fn(rollout) -> (B,) replaces the model's reward (e.g. an oracle). Returns the metrics:
    the rollout's stats, the first minibatch's ratio/clipfrac (1 and 0 by construction) and the
    means of the update metrics over all minibatches.
    """
    # 1.-3. roll out, score, advantages, all under no_grad: constants for the update
    batch = rollout_and_score(models, prompts, cfg, pad_id, stop_tokens, kl_ctl.value, score_fn, generator, close)
    lr = set_lr(optimizer, lr_at(step, cfg.optim, cfg.max_steps))
    # the clip's norm covers exactly what AdamW updates (actor, critic, adapters, heads), no frozen base
    params = trained_params(optimizer)
    n, logged = len(prompts), []
    for _ in range(cfg.ppo_epochs):                                   # 4. update
        # minibatch order from the (restored on resume) RNG, so a resumed run repeats it exactly
        for rows in torch.randperm(n, generator=generator).split(cfg.minibatch_size):
            loss, m = minibatch_loss(models, batch, rows, cfg)
            if not torch.isfinite(loss):
                raise MinilmError(f"PPO loss became {loss.item()} at step {step + 1}; lower --lr")
            loss.backward()
            m["grad_norm"] = optimizer_step(optimizer, params, cfg.optim.grad_clip, f"PPO step {step + 1}")
            logged.append(m)
    kl_ctl.update(batch["stats"]["kl"], n)  # adaptive beta tracks the KL; fixed: no-op
    # the first minibatch sees the policy that sampled, so its ratio must be 1: a check on the recompute
    row = {"step": step + 1, "lr": lr, **batch["stats"], "batch_tokens": int(batch["attention_mask"].sum()),
           "first_ratio": logged[0]["ratio"], "first_clipfrac": logged[0]["clipfrac"]}
    row.update({k: sum(m[k] for m in logged) / len(logged) for k in logged[0]})
    return row


def prompt_batch(prompts: list, batch_size: int, seed: int, step: int) -> list:
    """The prompts of PPO step `step`: a pure function of (seed, step)."""
    return random.Random(seed * 100_003 + step).sample(prompts, min(batch_size, len(prompts)))


def load_models(cfg: PPOConfig, device):
    """(models, tokenizer): cfg.init (+ cfg.reward_init for ppo/lora) arranged for cfg.variant."""
    if cfg.variant in ("hydra", "jhydra"):
        hydra, tokenizer = load_reward_model(cfg.init, device=device)   # Hydra-SFT: LM head + reward head
        return build_models(cfg.variant, cfg.lora, hydra), tokenizer
    ck = load_checkpoint(cfg.init, device=device)
    if adapter_names(ck.model):   # an SFT-with-LoRA checkpoint: its adapters become the base
        merge_and_unload(ck.model)
    reward, _ = load_reward_model(cfg.reward_init, device=device)
    return build_models(cfg.variant, cfg.lora, reward, ck.model), ck.tokenizer


@torch.no_grad()
def heldout_eval(models, tokenizer, conversations: list[dict], oracle, max_new_tokens: int,
                 missing_end_penalty: float, batch_size: int = 64) -> dict:
    """Greedy replies of the actor to held-out prompts: the oracle's judgement (reward, correct_rate,
    form_rate, end_rate) and the reward model's mean score (rm_score) of the same replies, read as
    PPO reads it (`reply_scores`, the penalty included)."""
    stops = [tokenizer.special_id("<|end|>"), tokenizer.eot_id]
    judged, scores = [], []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        with models.sampler() as policy:
            rollout = generate(policy, [render_prompt(tokenizer, c["messages"][:-1]) for c in chunk],
                               max_new_tokens, temperature=0.0, stop_tokens=stops, pad_id=tokenizer.eot_id)
        scores.append(reply_scores(models, rollout, TurnClose.of(tokenizer), tokenizer.eot_id, missing_end_penalty))
        for c, ids in zip(chunk, rollout.responses()):
            text, ended = parse_reply(tokenizer, ids)
            judged.append(oracle.judge(c["messages"][:-1], text, ended=ended))
    return {**summarize(judged), "rm_score": torch.cat(scores).mean().item()}


def ppo_prompts(cfg: PPOConfig, tokenizer, budget: int) -> tuple[list[dict], list[dict]]:
    """(train conversations whose prompt fits in `budget` tokens, held-out conversations to judge)."""
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = prompts_that_fit(tokenizer, instruction_examples(cfg.n_prompts, cfg.data_seed, sources, split="train"),
                             budget)
    heldout = prompts_that_fit(tokenizer, instruction_examples(cfg.n_eval, cfg.data_seed + 1, sources,
                                                               split="heldout"), budget)
    if not train or not heldout:
        raise MinilmError(f"no prompt fits in {budget} tokens; lower --max-new-tokens")
    return train, heldout


def save_state(cfg: PPOConfig, models, tokenizer, optimizer, kl_ctl, step: int, before: dict,
               metrics: list[dict]) -> None:
    """An atomic checkpoint at `step`: the policy (adapters and heads included) and, in train_state.pt,
    every trainable parameter of every role, the optimizer, beta, the RNG states and the "before"
    evaluation; then metrics.jsonl (temp file + rename). What run_ppo needs to resume exactly."""
    out = Path(cfg.out_dir)
    extra = {"heads": models.hydra.heads.state_dict()} if isinstance(models, HydraModels) else None
    state = {"optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(), "kl_coef": kl_ctl.value,
             "trainable": trainable_state(models), "before": before, "config": dataclasses.asdict(cfg)}
    meta = {"stage": "ppo", "variant": cfg.variant, "step": step, "init": cfg.init}
    policy = models.policy_model()
    # the checkpoint IS the policy: only the actor's adapter active, as the loader restores it, so that
    # eval, chat and export never fold the critic's adapter into it (hydra: both live on one trunk).
    # Resume reads every role from train_state's "trainable" instead.
    actor = getattr(models, "actor_adapter", None)
    with use_adapters(policy, actor) if actor else contextlib.nullcontext():
        save_checkpoint(out / "checkpoint", policy, tokenizer, state, meta=meta, extra=extra)
    write_metrics(metrics, out, plot=False)   # ppo.png is drawn at the end


def resume_state(cfg: PPOConfig, models, optimizer, kl_ctl) -> tuple[int, dict, list[dict]]:
    """(step, before, metrics) of cfg.out_dir/checkpoint, restored into models/optimizer/kl_ctl/RNG;
    (0, {}, []) when there is nothing to resume (or cfg.resume is False)."""
    ckpt_dir = Path(cfg.out_dir) / "checkpoint"
    if not (cfg.resume and has_train_state(ckpt_dir)):
        return 0, {}, []
    state = load_train_state(ckpt_dir)
    step = restore(state, optimizer, models, source=str(ckpt_dir))   # checks the trainable names
    tqdm.write(f"resuming from {ckpt_dir} at step {step}")
    if state.get("config", {}).get("variant", cfg.variant) != cfg.variant:
        raise MinilmError(f"{ckpt_dir} holds a {state['config']['variant']!r} run, not {cfg.variant!r}; "
                          f"use another --out-dir or --no-resume")
    kl_ctl.value = state["kl_coef"]
    return step, state["before"], read_metrics(Path(cfg.out_dir) / "metrics.jsonl", step)


def save_ppo(cfg: PPOConfig, metrics: list[dict], before: dict) -> dict:
    """ppo.png and eval.json beside the last checkpoint; returns the summary."""
    out = Path(cfg.out_dir)
    plot_ppo(metrics, out / "ppo.png")
    result = {"variant": cfg.variant, "checkpoint": str(out / "checkpoint"), "before": before,
              "after": {k[5:]: v for k, v in metrics[-1].items() if k.startswith("eval_")},
              "final_kl": metrics[-1]["kl"], "final_length": metrics[-1]["length"],
              "sec_per_sample": sum(m["sec_per_sample"] for m in metrics) / len(metrics)}
    write_json(out / "eval.json", result)
    return result


@one_writer
def run_ppo(cfg: PPOConfig, on_step=None) -> dict:
    """Train with PPO in cfg.variant; returns held-out greedy judgements before/after, KL, timings.

    Every cfg.ckpt_every steps (and at the end) an atomic checkpoint; a run started again with the
    same cfg continues from it and ends bit-identical to an uninterrupted one (prompts are a pure
    function of (seed, step), sampling and minibatch order come from the restored RNG).
    `on_step(step, row)` runs after every step (tests interrupt runs with it)."""
    check_settings(cfg, "ppo")   # a rerun into this out_dir must have the same settings
    rt = setup_runtime(cfg.device, "fp32")   # float32: the first ratio must be exactly 1
    torch.manual_seed(cfg.seed)  # fresh LoRA A matrices, then sampling
    models, tok = load_models(cfg, rt.device)
    # prompts must leave room for max_new_tokens in the context
    train, judge = ppo_prompts(cfg, tok, models.policy_model().config.max_seq_len - cfg.sample.max_new_tokens)
    oracle, stops, close = AnswerOracle(train + judge), [tok.special_id("<|end|>"), tok.eot_id], TurnClose.of(tok)
    optimizer, kl_ctl = make_optimizer(models, cfg.optim), make_kl_controller(cfg)  # one AdamW over every role

    def evaluate() -> dict:
        return heldout_eval(models, tok, judge, oracle, cfg.sample.max_new_tokens, cfg.missing_end_penalty)

    # a resumed run keeps its BEFORE judgement; a fresh one judges the start model first
    start, before, metrics = resume_state(cfg, models, optimizer, kl_ctl)
    if start == 0:
        before, metrics = evaluate(), []
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"ppo-{cfg.variant}")
    for step in bar:
        # this step's prompts are a pure function of (seed, step): resume needs no data position
        convs = prompt_batch(train, cfg.batch_size, cfg.seed, step)
        prompts = [render_prompt(tok, c["messages"][:-1]) for c in convs]
        score_fn = oracle_score_fn(tok, oracle, convs) if cfg.reward == "oracle" else None
        t0 = time.time()
        # 1. roll out, 2. score, 3. advantages, 4. update
        row = ppo_step(models, prompts, cfg, optimizer, kl_ctl, step, tok.eot_id, stops, score_fn, close=close)
        row["sec_per_sample"] = (time.time() - t0) / len(prompts)
        row["tokens"] = (metrics[-1].get("tokens", 0) if metrics else 0) + row["batch_tokens"]  # rollouts so far
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update({f"eval_{k}": v for k, v in evaluate().items()})
        metrics.append(row)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.2f}", vf=f"{row['vf_loss']:.3f}")
        # checkpoint, then metrics.jsonl (save_state): the log never runs ahead of the checkpoint
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            save_state(cfg, models, tok, optimizer, kl_ctl, step + 1, before, metrics)
        if on_step is not None:
            on_step(step + 1, row)
    if not metrics:
        raise MinilmError(f"{cfg.out_dir}/metrics.jsonl is missing; use another --out-dir or --no-resume")
    return save_ppo(cfg, metrics, before)
