"""The DNO stage: DNO-Prct iterations (Rosset et al. 2024, arXiv 2404.03715, Algorithm 2; lesson 09).

    minilm dno --init runs/sft-tiny/checkpoint --iterations 3 --samples 5 --oracle verifier
    torchrun --nproc_per_node 8 -m minilm dno --preset gpu --init runs/sft-small/checkpoint --fsdp
    summary = run_dno(dno_config("tiny", out_dir="runs/dno-tiny"))

For t = 1..T, on a fresh split of train prompts (`run_iteration`):
  1. sample K replies per prompt from pi_t (cfg.sample) and add the scripted teacher's;
  2. the oracle scores all K + 1 candidates (`score_candidates`);
  3. large-margin pairs (`build_pairs`): teacher > student, student > teacher, student > student;
  4. replay shares of iterations t-1's and t-2's pairs (`replay_pairs`);
  5. train pi_{t+1} from pi_t for <= 1 epoch with the DPO loss, reference pi_t (a frozen copy,
     or the same weights with LoRA off when lora_r > 0); with --fsdp under torchrun every rank
     samples and judges alike (rank 0 writes), and trains its micro-batches, both models sharded;
  6. judge pi_{t+1} (`evaluate_policy`): greedy replies on held-out prompts, win-rates against
     SFT, pi_t and the teacher under a separate verifier, with Wilson intervals.
Every iterate is kept (out_dir/iter_t/checkpoint); summary.json names the best of pi_1 (SFT) ...
pi_{T+1} on validation. Row t is pi_{t+1}; pair statistics sit in the row of the sampled iterate.
state.json holds finished iterations; an unfinished one reuses its pairs and resumes. Variants
(benchmarks/dno_baselines.py): pairs_mode restrictive | spin, loss regression | sft, reference
sft, large_margin false, one iteration of several epochs (offline DPO).

Deviations: a verifier on checkable answers instead of GPT-4, a scripted teacher; other oracles
score a candidate by 6 x its mean preference over the others; no n-gram negatives; lr decays by
lr_decay per iteration (the paper lowered it by hand); unended replies are never positives, and the
NLL (sft_weight, loss sft) falls only on chosen replies >= positive_min (minilm/post/dno.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.instructions import instruction_examples
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.config import Validated, from_preset
from minilm.fsdp import is_sharded, shard_model, sharded_run
from minilm.generate import SampleConfig, token_logprobs
from minilm.loop import LoopConfig, OptimConfig, run_loop
from minilm.post.base_model import LoRAConfig, init_model
from minilm.post.dno import (best_iterate, build_pairs, dno_regression_loss, make_batch_fn, place_pair_stats,
                             positive_nll, replay_pairs, scripted_teacher)
from minilm.post.dpo import dpo_loss, reference_logprobs
from minilm.post.oracles import JudgeOracle, RewardModelOracle, VerifierOracle
from minilm.post.preferences import encode_pairs, sample_replies, step_end_ids
from minilm.post.reward import load_reward_model
from minilm.post.winrate import head_to_head, plot_winrates, win_rate, winrate_table
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import read_json, write_json


@dataclass
class DNOConfig(Validated):
    out_dir: str = "runs/dno-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    batch_size: int = 32            # examples per step
    eval_every: int = 10_000        # the loop's eval is off; each iteration is judged after training
    ckpt_every: int = 25            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 5              # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    micro_batches: int = 0          # each step's batch in N micro-batches over all ranks (0: one per rank)
    fsdp: bool = False              # under torchrun: data parallel, weights, gradients and AdamW sharded
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the layer in backward
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=3))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r > 0: each iteration trains LoRA adapters
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=80, temperature=0.7, top_p=0.95))
    iterations: int = 3
    n_prompts: int = 300            # fresh train prompts per iteration
    samples: int = 5                # K replies per prompt from pi_t (+ 1 teacher reply)
    oracle: str = "verifier"        # verifier, reward, judge (cyclic: the tabular demo, dno.py)
    oracle_checkpoint: str = ""     # the reward model (reward) or judge model (judge)
    teacher_error: float = 0.25     # share of prompts where the scripted teacher is wrong
    pairs_mode: str = "dno"         # dno, restrictive (teacher > student only), spin (teacher > all)
    large_margin: bool = True
    positive_min: float = 5.0
    teacher_margin: float = 2.0
    student_margin: float = 1.0
    replay: str = "0.3,0.15"        # shares of iteration t-1's, t-2's pairs
    loss: str = "dpo"               # dpo (Algorithm 2), regression (Algorithm 1), sft (positives)
    reference: str = "previous"     # previous (pi_t) or sft (fixed)
    epochs: float = 1.0             # passes over an iteration's pairs (DNO: <= 1)
    beta: float = 0.1
    sft_weight: float = 0.0
    credit: str = "reply"           # reply: the preference terms read whole replies; step: up to the end
                                    # of the step where the two replies part (Step-DPO, pair_batch)
    lr_decay: float = 1.0
    sources: str = "ops1,ops2,ops3,ops4,units,word"  # prompts: the skill ladder (data_prep/ladder.py)
    n_val: int = 150
    n_test: int = 300
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 192


DNO_PRESETS = {  # ~1M-param SFT model, 2 CPU cores, ~35 s per iteration. + NLL of the chosen replies
    # (DPO + NLL, Iterative RPO) keeps greedy replies fluent. The lr is measured on the held-out ladder
    # (lesson 09): after 3 iterations, 5e-4 cost 0.39 of accuracy, 2e-4 0.23 (0.27 with whole-reply
    # credit), 5e-5 0.03.
    "tiny": dict(sft_weight=1.0, lr=5e-5, credit="step", n_prompts=128, samples=4, n_val=64, n_test=128),
}
DNO_PRESETS["ci"] = dict(DNO_PRESETS["tiny"], lr=5e-4, iterations=2, n_prompts=24, samples=3, n_val=16, n_test=24)
DNO_PRESETS["laptop"] = dict(DNO_PRESETS["tiny"], n_prompts=96, samples=3, n_val=48, n_test=96)   # 20 minutes
DNO_PRESETS["gpu"] = dict(DNO_PRESETS["tiny"], iterations=3, n_prompts=2000, n_val=500, n_test=1000)
# the fields `minilm dno --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "iterations", "n_prompts", "samples", "oracle", "oracle_checkpoint",
         "pairs_mode", "loss", "reference", "beta", "sft_weight", "lr", "batch_size",
         "temperature", "max_new_tokens", "sources", "seed", "device", "dtype", "resume", "fsdp")


def dno_config(preset: str = "tiny", **overrides) -> DNOConfig:
    return from_preset(DNOConfig, DNO_PRESETS, preset, "dno", **overrides)


def check_config(cfg: DNOConfig) -> None:
    choices = {"oracle": ("verifier", "reward", "judge"), "pairs_mode": ("dno", "restrictive", "spin"),
               "loss": ("dpo", "regression", "sft"), "reference": ("previous", "sft"),
               "credit": ("reply", "step")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise MinilmError(f"{key} must be one of {', '.join(allowed)}, not {getattr(cfg, key)!r}")
    if cfg.iterations < 1 or cfg.samples < 1 or cfg.n_prompts < 1:
        raise MinilmError("iterations, samples and n_prompts must all be >= 1")
    if cfg.oracle != "verifier" and not cfg.oracle_checkpoint:
        raise MinilmError(f"--oracle {cfg.oracle} needs --oracle-checkpoint DIR (the model it runs)")
    if not 0 <= cfg.teacher_error <= 1 or cfg.epochs <= 0 or cfg.beta <= 0:
        raise MinilmError("teacher_error must be in [0, 1], epochs and beta > 0")


def dno_data(cfg: DNOConfig) -> dict:
    """Train prompts in T non-overlapping chunks, validation and test prompts (held-out split)."""
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    train = instruction_examples(cfg.iterations * cfg.n_prompts, cfg.data_seed, sources, split="train")
    if len(train) < cfg.iterations * cfg.n_prompts:
        raise MinilmError(f"only {len(train)} distinct train prompts for {cfg.iterations} x {cfg.n_prompts}")
    held = instruction_examples(cfg.n_val + cfg.n_test, cfg.data_seed + 1, sources, split="heldout")
    chunks = [train[t * cfg.n_prompts:(t + 1) * cfg.n_prompts] for t in range(cfg.iterations)]
    return {"chunks": chunks, "val": held[:cfg.n_val], "test": held[cfg.n_val:]}


def make_oracle(cfg: DNOConfig, conversations: list[dict]):
    if cfg.oracle == "verifier":
        return VerifierOracle(conversations)
    if cfg.oracle == "reward":
        return RewardModelOracle(*load_reward_model(cfg.oracle_checkpoint))
    ck = load_checkpoint(cfg.oracle_checkpoint)
    return JudgeOracle(ck.model, ck.tokenizer)


def make_loss_fn(cfg: DNOConfig, reference):
    def loss_fn(model, batch):
        b = batch["tokens"].shape[0] // 2  # rows [:b] chosen, [b:] rejected
        tensors = {k: v for k, v in batch.items() if k not in ("r", "positive")}  # the (2B, T) pair batch alone
        token_lp = token_logprobs(model, batch["tokens"], batch["attention_mask"])           # (2B, T)
        replies = batch["loss_mask"].to(token_lp.dtype)
        # NLL per token of the WHOLE chosen replies that passed positive_min (sft: the whole loss; dpo: + sft_weight x)
        nll = positive_nll((token_lp * replies)[:b].sum(1), replies[:b].sum(1), batch["positive"])
        # the preference terms read the credited tokens: whole replies, or up to the parting step (--credit step)
        policy = (token_lp * batch["credit_mask"].to(token_lp.dtype)).sum(1)                 # (2B,)
        if cfg.loss == "sft":   # SFT on the positives
            return nll, {"chosen_nll": nll.item()}
        ref = reference_logprobs(model, tensors, reference)  # (2B,), no grad: the reference is fixed
        if cfg.loss == "regression":
            r = batch["r"].to(policy.device)  # (2B,) expected win-rates
            return dno_regression_loss(policy[:b], policy[b:], ref[:b], ref[b:], r[:b], r[b:], cfg.beta)
        loss, metrics = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], cfg.beta)   # as dpo_batch_loss,
        metrics.update(logp_chosen=policy[:b].mean().item(), logp_rejected=policy[b:].mean().item())
        if cfg.sft_weight > 0:                          # but its NLL term skips non-positive chosen replies
            metrics["chosen_nll"] = nll.item()
            loss = loss + cfg.sft_weight * nll
        return loss, metrics
    return loss_fn


def greedy_replies(model, tokenizer, conversations, max_new_tokens: int) -> list[str]:
    """The judged string (text + <|end|> or <|endoftext|>) of each greedy reply."""
    prompts = [c["messages"][:-1] for c in conversations]
    return [r[0][1] for r in sample_replies(model, tokenizer, prompts, 1, max_new_tokens, temperature=0.0)]


def reply_length(tokenizer, judged: str) -> int:
    return len(tokenizer.encode(judged.split("<|")[0].strip())) + 1   # + its closing special token


def evaluate_policy(replies: dict, data: dict, judge: VerifierOracle, tokenizer, t: int) -> dict:
    """One row of the iteration table: win-rates on the test prompts, validation points, length."""
    test = [c["messages"][:-1] for c in data["test"]]
    mine = replies[t]["test"]
    row = {"name": f"iter {t}" if t else "SFT"}
    for key, other in (("vs_sft", replies[0]["test"]), ("vs_prev", replies[max(0, t - 1)]["test"]),
                       ("vs_teacher", replies["teacher"])):
        row[key] = win_rate(head_to_head(judge, test, mine, other)) if t or key == "vs_teacher" else None
    val = [c["messages"][:-1] for c in data["val"]]
    row["val_points"] = sum(judge.score_many(val, replies[t]["val"])) / len(val)
    row["test_correct"] = sum(p == 6 for p in judge.score_many(test, mine)) / len(test)  # 6: full points
    row["length"] = sum(reply_length(tokenizer, r) for r in mine) / len(mine)
    return row


def load_reference(cfg: DNOConfig, model, sft_model):
    """pi_t frozen: None under LoRA (adapters off = pi_t), else a copy; or the fixed SFT model."""
    if cfg.reference == "sft":
        return sft_model
    # the reference must not move while pi_{t+1} trains: no grad, eval mode (no dropout)
    return None if cfg.lora.r > 0 else copy.deepcopy(model).requires_grad_(False).eval()


def _read_pairs(path: Path) -> list[dict]:
    pairs = read_json(path, list, fix="delete the iteration's folder to sample it again") if path.exists() else []
    if any("chosen_positive" not in p for p in pairs):   # written before the NLL filter existed
        raise MinilmError(f"{path} was written by an older minilm (its pairs lack 'chosen_positive'); "
                          f"start this run in a new --out-dir")
    return pairs


def run_iteration(cfg: DNOConfig, t: int, data: dict, oracle, monitor, sft_model, tokenizer, rt) -> dict:
    """Steps 1-5 for iteration t (1-based): pi_t = iter_{t-1}'s checkpoint -> iter_t's."""
    it_dir = Path(cfg.out_dir, f"iter_{t}")
    prev = cfg.init if t == 1 else str(Path(cfg.out_dir, f"iter_{t - 1}", "checkpoint"))
    # each iteration is a fresh run_loop: its own out_dir, resume and schedule, lr decayed per iteration
    it_cfg = LoopConfig(out_dir=str(it_dir), init=prev, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
                        log_every=cfg.log_every, device=cfg.device, resume=cfg.resume,
                        optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * cfg.lr_decay ** (t - 1)),
                        micro_batches=cfg.micro_batches, fsdp=cfg.fsdp,
                        activation_checkpointing=cfg.activation_checkpointing)
    torch.manual_seed(cfg.seed + t)  # fresh LoRA A matrices, per iteration
    model, _ = init_model(prev, cfg.lora, rt.device)  # pi_t (earlier adapters merged; fresh ones when lora_r > 0)
    stats_path = it_dir / "pairs_stats.json"
    if not (it_dir / "pairs.json").exists():                                              # 1.-3.
        # 1. K replies per prompt from pi_t and the teacher's; 2. score; 3. select pairs (build_pairs)
        convs = data["chunks"][t - 1]
        prompts = [c["messages"][:-1] for c in convs]
        g = torch.Generator().manual_seed(cfg.data_seed * 1000 + t)  # samples fixed per iteration
        model.eval()
        before = oracle.calls
        students = sample_replies(model, tokenizer, prompts, cfg.samples, cfg.sample.max_new_tokens,
                                  cfg.sample.temperature, cfg.sample.top_p, generator=g)
        rng = random.Random(cfg.data_seed * 1000 + t)
        teachers = [scripted_teacher(c, rng, cfg.teacher_error) for c in convs]
        pairs, stats = build_pairs(cfg, oracle, monitor, prompts, students, teachers)
        stats["oracle_calls"] = oracle.calls - before   # this iteration's budget
        if rt.is_main:   # under torchrun every rank sampled the same replies (unsharded pi_t, same seeds)
            it_dir.mkdir(parents=True, exist_ok=True)
            write_json(stats_path, stats, indent=None)
            write_json(it_dir / "pairs.json", pairs, indent=None)   # written last: the check above reads it
    rt.barrier()   # every rank reads what rank 0 wrote
    # an interrupted iteration reads its pairs back instead of sampling them again
    pairs, stats = _read_pairs(it_dir / "pairs.json"), read_json(stats_path, fix="delete the iteration's folder to sample it again")
    earlier = [_read_pairs(Path(cfg.out_dir, f"iter_{s}", "pairs.json")) for s in range(t - 1, 0, -1)]
    shares = tuple(float(x) for x in cfg.replay.split(",") if x.strip()) or (0.0,)
    train = pairs + replay_pairs(earlier, shares, seed=cfg.seed + t)                       # 4.
    if cfg.loss == "sft":   # SFT on positives: each distinct chosen reply above positive_min once
        train = list({(json.dumps(p["prompt"]), p["chosen"]): {**p, "rejected": p["chosen"], "rejected_ended": True}
                      for p in train if p["chosen_positive"]}.values())
    if not train:
        raise MinilmError(f"iteration {t} produced no pairs; raise --samples or --n-prompts, or "
                          f"turn off --large-margin")
    encoded, kept = encode_pairs(tokenizer, train, cfg.max_len)
    # 5. train pi_{t+1} from pi_t on epochs x the pairs (<= 1 pass in DNO), reference as cfg.reference says
    it_cfg.max_steps = max(1, int(cfg.epochs * len(encoded)) // cfg.batch_size)            # 5.
    step_ends = step_end_ids(tokenizer) if cfg.credit == "step" else ()
    batch_fn = make_batch_fn(encoded, kept, cfg.batch_size, cfg.seed + t, tokenizer.eot_id, cfg.max_len, step_ends)
    reference = load_reference(cfg, model, sft_model)
    if cfg.fsdp and rt.distributed and not is_sharded(reference):   # (LoRA, reference None, is refused)
        shard_model(reference, rt)   # like the policy, as minilm/stages/dpo.py says why; SFT once for all t
    summary = run_loop(it_cfg, model, batch_fn, make_loss_fn(cfg, reference), None, tokenizer=tokenizer,
                       stage="dno", rt=rt)
    # pair_stats describe pi_t's samples; train_stats the training of pi_{t+1}
    train_stats = dict(n_train_pairs=len(encoded), n_replayed=len(train) - len(pairs), steps=it_cfg.max_steps,
                       final_loss=summary["final_loss"])
    return {"model": model.eval(), "pair_stats": stats, "train_stats": train_stats}


@one_writer
def run_dno(cfg: DNOConfig) -> dict:
    """T iterations of DNO-Prct from cfg.init; returns the per-iteration table and the best iterate."""
    rt = setup_runtime(cfg.device, cfg.dtype)    # under torchrun every rank runs the stage; rank 0 writes
    check_settings(cfg, "dno", write=rt.is_main)   # a rerun into this out_dir must have the same settings
    check_config(cfg)
    sharded_run(cfg, rt)   # refused early: torchrun without --fsdp, LoRA under FSDP, an uneven batch
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dno_data(cfg)
    ck = load_checkpoint(cfg.init, device=rt.device)
    sft_model, tokenizer = ck.model.eval().requires_grad_(False), ck.tokenizer  # frozen: baseline and reference=sft
    train_convs = [c for chunk in data["chunks"] for c in chunk]
    # oracle: labels the pairs (its calls are the budget); monitor: a verifier that only measures
    oracle, monitor = make_oracle(cfg, train_convs), VerifierOracle(train_convs)
    judge = VerifierOracle(data["val"] + data["test"])   # held-out: its calls are not the budget
    state_path = out / "state.json"
    state = (read_json(state_path, fix="pass --out-dir NEW, or --no-resume to start over") if state_path.exists()
             else {"rows": [], "replies": {}})
    # state.json is only valid for the same prompts: a changed data config must not resume
    data_key = [cfg.iterations * cfg.n_prompts, cfg.n_prompts, cfg.n_val, cfg.n_test, cfg.sources, cfg.data_seed]
    if state.setdefault("data_key", data_key) != data_key:
        raise MinilmError(f"{out} was run with other prompts (iterations x n_prompts, n_val, n_test, "
                          f"sources, data_seed = {state['data_key']}); use another --out-dir")
    replies = {int(k) if k.isdigit() else k: v for k, v in state["replies"].items()}
    # iteration 0: the SFT model's greedy replies and the teacher's, judged once
    if not replies:
        rng = random.Random(cfg.data_seed + 99)
        replies["teacher"] = [scripted_teacher(c, rng, cfg.teacher_error) + "<|end|>" for c in data["test"]]
        replies[0] = {s: greedy_replies(sft_model, tokenizer, data[s], cfg.sample.max_new_tokens) for s in ("val", "test")}
        state["rows"] = [evaluate_policy(replies, data, judge, tokenizer, 0)]
    calls = state.get("oracle_calls", 0)
    for t in range(len(state["rows"]), cfg.iterations + 1):  # rows[0] is SFT: resume after the last row
        result = run_iteration(cfg, t, data, oracle, monitor, sft_model, tokenizer, rt)
        replies[t] = {s: greedy_replies(result["model"], tokenizer, data[s], cfg.sample.max_new_tokens)
                      for s in ("val", "test")}                                            # 6.
        pair_stats = dict(result["pair_stats"])
        calls += pair_stats.pop("oracle_calls")   # this iteration's; rows carry the running total
        row = {**evaluate_policy(replies, data, judge, tokenizer, t), **result["train_stats"], "oracle_calls": calls}
        state["rows"] = place_pair_stats(state["rows"], row, pair_stats)   # pairs of pi_t: row t - 1
        state.update(replies={str(k): v for k, v in replies.items()}, oracle_calls=calls)
        if rt.is_main:
            write_json(state_path, state, indent=None)
    return finish(cfg, state["rows"], write=rt.is_main)


def finish(cfg: DNOConfig, rows: list[dict], write: bool = True) -> dict:
    """Best iterate on validation, SFT (rows[0], cfg.init) included; the table and the plot (written
    unless `write` is False: torchrun's other ranks)."""
    best = best_iterate(rows)
    columns = ["vs_sft", "vs_prev", "vs_teacher", "test_correct", "val_points", "length",
               "share_student>teacher", "best_of_k_beats_teacher", "n_train_pairs", "oracle_calls"]
    table = winrate_table(rows, columns)
    out = Path(cfg.out_dir)
    summary = {"rows": rows, "best_iteration": best, "table": table,
               "best_checkpoint": str(out / f"iter_{best}" / "checkpoint") if best else cfg.init,
               "config": dataclasses.asdict(cfg)}
    if write:
        (out / "table.md").write_text(table + "\n")
        plot_winrates(rows, out / "winrate.png", series=["vs_sft", "vs_prev", "vs_teacher"])
        write_json(out / "summary.json", summary)
    return summary
