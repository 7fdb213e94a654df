"""The evaluation suite: one fixed set of measurements for every stage's model (lesson 12).

    from minilm.eval.suite import suite_config, evaluate_checkpoint
    row = evaluate_checkpoint("runs/dpo-tiny/checkpoint", suite_config("ci"), "runs/data/pinned-2048",
                              reference_path="runs/sft-tiny/checkpoint", cache={})
    row["ladder_acc"], row["bpb"], row["winrate"]  # floats (None: not measured); ladder_correct: 0/1 per item

The same suite runs on the pretrained, SFT, DPO, PPO, DNO, LTC and pruned models, so the report
can show what each stage bought (nanochat's report card does this for its stages). Every prompt is
held out from training and every reply is greedy or seeded, so one model and config give one dict:

  ladder_acc, ladder_acc_mid, ladder_<rung>   held-out skill-ladder accuracy (minilm/eval/ladder.py);
                  ladder_correct keeps the 0/1 per item, for paired gains over SFT (`ladder_gains`)
  bpb, loss       bits per UTF-8 byte and nats per token on the data's "val" split, through
                  `minilm.stages.pretrain.evaluate` itself (the number pretraining logs)
  math_acc        held-out GSM8K-shaped word problems; correct when the LAST integer is the answer
  end_rate, form_rate, correct   held-out chat prompts, judged as the SFT stage judges them
  winrate, _lo, _hi   head-to-head against the reference (SFT) model's replies under
                  `ReferenceF1Judge`, a judge no stage trains against; ties 1/2, 95% Wilson interval
  winrate_sampled, _lo, _hi   the same on one SAMPLED reply per prompt (winrate_temperature), both
                  models drawing from one seeded generator: what a user who samples would see
  env_success_household, _qa, _math   held-out episodes of each LTC environment, the agent alone,
                  greedy (LTC's own evaluation); env_success is their mean

A prompt that leaves no room for its reply budget is not asked and counts as a failed reply.
Deviation from nanochat's report card: no external benchmark (none ships offline); the held-out
sets come from the generators and pages the training data come from. Lesson 12 says what each
metric misses at 1M parameters.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.instructions import DEFAULT_SOURCES, SYNTHETIC, instruction_examples, split_of
from data_prep.ladder import LADDER
from minilm import MinilmError
from minilm.agents.envs import ENVS
from minilm.agents.envs.base import content_split
from minilm.checkpoint import load_checkpoint
from minilm.config import Validated, from_preset
from minilm.data import TokenDataset
from minilm.eval.ladder import ladder_items, ladder_metrics
from minilm.lora import adapter_names, merge_and_unload
from minilm.post.chat import render_prompt
from minilm.post.oracles import AnswerOracle, ScoreOracle, split_reply, token_f1
from minilm.post.preferences import sample_replies
from minilm.post.sft import greedy_judgements
from minilm.post.winrate import head_to_head, win_rate
from minilm.runtime import Runtime
from minilm.stages.ltc import evaluate as evaluate_agent
from minilm.stages.ltc import ltc_config, make_envs
from minilm.stages.pretrain import TrainConfig
from minilm.stages.pretrain import evaluate as evaluate_text

ENV_NAMES = tuple(sorted(ENVS))     # household, math, qa: LTC's three environments
METRICS = ("ladder_acc", "ladder_acc_mid", *(f"ladder_{r}" for r in LADDER), "bpb", "loss", "math_acc",
           "end_rate", "form_rate", "correct", "winrate", "winrate_lo", "winrate_hi",
           "winrate_sampled", "winrate_sampled_lo", "winrate_sampled_hi",
           *(f"env_success_{e}" for e in ENV_NAMES), "env_success")
FAILED = {"correct": False, "in_form": False, "ended": False, "f1": 0.0, "reward": 0.0, "reply": ""}


@dataclass
class SuiteConfig(Validated):
    n_ladder: int = 50              # held-out skill-ladder problems per rung
    ladder_new_tokens: int = 96     # reply budget for ladder problems (worked replies run 15-90 tokens)
    n_bpb_batches: int = 8          # validation windows: n_bpb_batches * batch_size of seq_len tokens
    n_math: int = 64                # held-out word problems
    n_chat: int = 200               # held-out chat prompts (format compliance)
    n_winrate: int = 200            # held-out chat prompts judged against the reference
    n_env: int = 32                 # held-out episodes of each environment (household, qa, math)
    max_new_tokens: int = 96        # reply budget for chat prompts (worked ladder replies run 15-90 tokens)
    winrate_temperature: float = 0.7  # the sampled win-rate's temperature (0: greedy win-rate only)
    math_new_tokens: int = 96       # reply budget for word problems (worked solutions ~60-90 tokens)
    seed: int = 0                   # which held-out prompts are drawn
    batch_size: int = 32            # prompts / windows / episodes per forward pass
    seq_len: int = 0                # bpb window length; 0: the model's max_seq_len
    sources: str = ",".join(DEFAULT_SOURCES)   # chat prompt kinds (data_prep/instructions.py)
    device: str = "auto"            # evaluate_checkpoint only: auto, cpu, cuda


SUITE_PRESETS = {
    "ci": dict(n_ladder=4, n_bpb_batches=2, n_math=16, n_chat=32, n_winrate=32, n_env=8, batch_size=16,
               math_new_tokens=64, ladder_new_tokens=64),
    "laptop": dict(n_env=8, n_math=32, n_chat=64, n_winrate=64),   # the speedrun's 20 minutes
    "gpu": dict(n_ladder=200, n_bpb_batches=32, n_math=256, n_chat=500, n_winrate=500, n_env=100, batch_size=128),
}


def suite_config(preset: str = "laptop", **overrides) -> SuiteConfig:
    return from_preset(SuiteConfig, SUITE_PRESETS, preset, "eval suite", **overrides)


def _check(cfg: SuiteConfig) -> None:
    sizes = ("n_ladder", "n_bpb_batches", "n_math", "n_chat", "n_winrate", "n_env", "seq_len", "winrate_temperature")
    bad = [f"{k}={getattr(cfg, k)}" for k in sizes if getattr(cfg, k) < 0]
    bad += [f"{k}={getattr(cfg, k)}" for k in ("batch_size", "max_new_tokens", "math_new_tokens", "ladder_new_tokens")
            if getattr(cfg, k) < 1]
    if bad:
        raise MinilmError(f"invalid suite sizes {', '.join(bad)}: counts must be >= 0 (0 skips the "
                          f"metric), batch_size and reply budgets >= 1")


# ---- held-out text: bits per byte

def resolve_data_dir(data_dir) -> Path:
    """The prepared directory itself, or its phase1/ (a data pipeline's output folder)."""
    path = Path(data_dir)
    if not (path / "meta.json").exists() and (path / "phase1" / "meta.json").exists():
        return path / "phase1"
    return path


def text_metrics(model, tokenizer, cfg: SuiteConfig, data_dir) -> dict:
    """{"bpb", "loss"} from minilm.stages.pretrain.evaluate over the val split's fixed windows."""
    data = TokenDataset(resolve_data_dir(data_dir), "val")
    want = data.meta.get("tokenizer", {}).get("fingerprint")  # None for data without one
    if want and want != tokenizer.fingerprint():
        raise MinilmError(f"{data.directory} was tokenized with tokenizer {want}, the model uses "
                          f"{tokenizer.fingerprint()}; evaluate on data prepared with the model's tokenizer")
    seq_len = min(cfg.seq_len or model.config.max_seq_len, model.config.max_seq_len)  # capped: a pruned or small model
    train_cfg = TrainConfig(eval_batches=cfg.n_bpb_batches, batch_size=cfg.batch_size, seq_len=seq_len)
    rt = Runtime(next(model.parameters()).device, None)   # float32: the same number on any device
    out = evaluate_text(model, data, train_cfg, rt)
    model.eval()                                          # evaluate leaves the model in train mode
    return {"bpb": out["val_bpb"], "loss": out["val_loss"]}


# ---- held-out prompts

def math_problems(n: int, seed: int) -> list[dict]:
    """n word-problem conversations held out by the instruction split AND the math env's split."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(n * 1000):      # ~2% of problems are held out by both (10% x 20%)
        if len(out) == n:
            break
        ex = SYNTHETIC["word_problem"](rng)
        question = ex["messages"][0]["content"]
        if ex["id"] not in seen and split_of(ex["id"]) == "heldout" and content_split(question) == "test":
            seen.add(ex["id"])
            out.append(ex)
    if len(out) < n:
        raise MinilmError(f"found only {len(out)} held-out word problems of the {n} asked; lower n_math")
    return out


def chat_conversations(n: int, seed: int, sources: str) -> list[dict]:
    """n held-out chat conversations (data_prep.instructions, split "heldout")."""
    kinds = tuple(s.strip() for s in sources.split(",") if s.strip())
    return instruction_examples(n, seed, kinds, split="heldout") if n else []


def judged_replies(model, tokenizer, conversations, max_new_tokens: int, batch_size: int) -> list[dict]:
    """AnswerOracle's judgement of the greedy reply to each prompt (the SFT stage's
    `greedy_judgements`); a prompt too long for prompt + max_new_tokens counts as FAILED."""
    limit = model.config.max_seq_len - max_new_tokens
    # a prompt that leaves no room for the reply budget is not asked: it counts as FAILED below
    fits = [len(render_prompt(tokenizer, c["messages"][:-1])) <= limit for c in conversations]
    asked = [c for c, f in zip(conversations, fits) if f]
    judged = iter(greedy_judgements(model, tokenizer, asked, AnswerOracle(conversations),  # in order
                                    max_new_tokens, batch_size))
    return [next(judged) if f else {**FAILED, "kind": c.get("kind")} for c, f in zip(conversations, fits)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---- win-rate under a held-out judge

class ReferenceF1Judge(ScoreOracle):
    """Score = token F1 of the reply with the reference answer; the higher F1 wins (ties 1/2).

    A judge no training stage optimises (see the module docstring); format is ignored on purpose.
    """

    def __init__(self, conversations):
        super().__init__()
        self.answers = AnswerOracle(conversations)

    def _score(self, items):
        return [token_f1(split_reply(reply)[0], self.answers.reference(q)[0]) for q, reply in items]


def weights_digest(model) -> str:
    """A short hash of every weight: which reference a cache entry belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())  # float: numpy has no bf16
    return h.hexdigest()[:16]


def sampled_replies(model, tokenizer, conversations, cfg: SuiteConfig) -> list[str]:
    """One reply per prompt at cfg.winrate_temperature, from a generator seeded by cfg.seed, so that
    two models draw the same random numbers; a prompt with no room for its budget gets ""."""
    room = model.config.max_seq_len - cfg.max_new_tokens
    prompts = [c["messages"][:-1] for c in conversations]
    fits = [len(render_prompt(tokenizer, p)) <= room for p in prompts]
    g = torch.Generator().manual_seed(cfg.seed)
    drawn = iter(sample_replies(model, tokenizer, [p for p, f in zip(prompts, fits) if f], 1, cfg.max_new_tokens,
                                cfg.winrate_temperature, batch_size=cfg.batch_size, generator=g))
    return [next(drawn)[0][0] if f else "" for f in fits]


def reference_replies(reference, tokenizer, conversations, cfg: SuiteConfig, cache: dict | None,
                      sampled: bool = False) -> list[str]:
    """The reference's greedy (or sampled) replies, computed once per (weights, prompts, budget)."""
    # everything the replies depend on: the same key means the same replies
    key = (f"reference_replies/{'sampled' if sampled else 'greedy'}/{weights_digest(reference)}/{cfg.seed}/"
           f"{len(conversations)}/{cfg.sources}/{cfg.max_new_tokens}/{cfg.batch_size}/{cfg.winrate_temperature}")
    if cache is not None and key in cache:
        return cache[key]
    replies = (sampled_replies(reference, tokenizer, conversations, cfg) if sampled else
               [j["reply"] for j in judged_replies(reference, tokenizer, conversations, cfg.max_new_tokens,
                                                   cfg.batch_size)])
    if cache is not None:
        cache[key] = replies
    return replies


def winrate_metrics(mine: list[str], theirs: list[str], conversations, name: str = "winrate") -> dict:
    prompts = [c["messages"][:-1] for c in conversations]
    row = win_rate(head_to_head(ReferenceF1Judge(conversations), prompts, mine, theirs))
    return {name: row["win_rate"], f"{name}_lo": row["lo"], f"{name}_hi": row["hi"]}


def chat_metrics(model, tokenizer, cfg: SuiteConfig, reference=None, cache: dict | None = None) -> dict:
    """end_rate / form_rate / correct on the first n_chat held-out prompts, and the win-rate
    against `reference` on the first n_winrate, from one set of greedy replies.

    The prompts are always drawn as max(n_chat, n_winrate), so the chat rates do not depend on
    whether a reference was given.
    """
    n_win = cfg.n_winrate if reference is not None else 0  # no reference: no win-rate
    convs = chat_conversations(max(cfg.n_chat, cfg.n_winrate), cfg.seed, cfg.sources)
    # one set of greedy replies serves both the chat rates and the win-rate
    judged = judged_replies(model, tokenizer, convs[:max(cfg.n_chat, n_win)], cfg.max_new_tokens,
                            cfg.batch_size)
    out = {}
    if cfg.n_chat:
        chat = judged[:cfg.n_chat]
        out.update(end_rate=_mean(j["ended"] for j in chat), form_rate=_mean(j["in_form"] for j in chat),
                   correct=_mean(j["correct"] for j in chat))
    if n_win:
        theirs = reference_replies(reference, tokenizer, convs[:n_win], cfg, cache)
        out.update(winrate_metrics([j["reply"] for j in judged[:n_win]], theirs, convs[:n_win]))
    if n_win and cfg.winrate_temperature > 0:
        theirs = reference_replies(reference, tokenizer, convs[:n_win], cfg, cache, sampled=True)
        mine = sampled_replies(model, tokenizer, convs[:n_win], cfg)
        out.update(winrate_metrics(mine, theirs, convs[:n_win], "winrate_sampled"))
    return out


# ---- environment success

def env_success(model, tokenizer, cfg: SuiteConfig, env: str) -> float:
    """Success on cfg.n_env held-out seeds of `env`: LTC's own evaluation (Monologue, greedy)."""
    ltc = ltc_config("tiny", env=env, n_test=cfg.n_env, eval_temperature=0.0)
    envs = make_envs(ltc, "test", min(cfg.n_env, cfg.batch_size))  # episodes run in parallel
    return evaluate_agent(model, tokenizer, envs, ltc)["success"]


# ---- the suite

@torch.no_grad()
def evaluate_model(model, tokenizer, cfg: SuiteConfig, data_dir, reference=None,
                   cache: dict | None = None) -> dict:
    """Every metric of the suite for one model: {key: float or None} with METRICS as keys, plus
    "ladder_correct" (the 0/1 score of each held-out ladder item, or None).

    reference: the model to win against (the SFT model); its tokenizer must be `tokenizer`'s.
    cache: a dict the caller keeps between calls; the reference's replies are stored in it.
    A count of 0 in cfg skips its metric (None); so does data_dir=None for bpb/loss.
    """
    _check(cfg)
    out = dict.fromkeys(METRICS)  # None until measured
    scores = None
    was_training = model.training
    model.eval()
    try:
        if cfg.n_ladder:
            items = ladder_items(cfg.n_ladder, cfg.seed)
            judged = judged_replies(model, tokenizer, items, cfg.ladder_new_tokens, cfg.batch_size)
            scores = [int(j["correct"]) for j in judged]   # in item order: the paired gain needs it
            out.update(ladder_metrics(scores, items))
        if cfg.n_bpb_batches and data_dir is not None:
            out.update(text_metrics(model, tokenizer, cfg, data_dir))
        if cfg.n_math:
            judged = judged_replies(model, tokenizer, math_problems(cfg.n_math, cfg.seed),
                                    cfg.math_new_tokens, cfg.batch_size)
            out["math_acc"] = _mean(j["correct"] for j in judged)
        if cfg.n_chat or (cfg.n_winrate and reference is not None):
            out.update(chat_metrics(model, tokenizer, cfg, reference, cache))
        if cfg.n_env:
            for env in ENV_NAMES:
                out[f"env_success_{env}"] = env_success(model, tokenizer, cfg, env)
            out["env_success"] = _mean(out[f"env_success_{e}"] for e in ENV_NAMES)
    finally:
        model.train(was_training)  # even if a metric raised
    return {**{k: None if v is None else float(v) for k, v in out.items()}, "ladder_correct": scores}


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinilmError(f"device {name!r} requested but this torch sees no CUDA GPU; use device='cpu'")
    return name


def load_for_eval(path, device: str = "cpu"):
    """(model, tokenizer) of a checkpoint, LoRA adapters merged in, in eval mode."""
    if not Path(path).is_dir():
        raise MinilmError(f"cannot evaluate {path}: no such checkpoint directory (a stage's "
                          f"checkpoint is OUT_DIR/checkpoint)")
    ck = load_checkpoint(path, device=device)     # its own clear errors for an invalid checkpoint
    if ck.tokenizer is None:
        raise MinilmError(f"{path} has no tokenizer; the suite needs one to build prompts")
    model = merge_and_unload(ck.model) if adapter_names(ck.model) else ck.model  # the model as it computes
    return model.eval(), ck.tokenizer


def evaluate_checkpoint(path, cfg: SuiteConfig, data_dir, reference_path=None,
                        cache: dict | None = None) -> dict:
    """`evaluate_model` on a saved checkpoint (LoRA merged, pruned FFN widths as saved)."""
    device = _device(cfg.device)
    model, tokenizer = load_for_eval(path, device)
    reference = None
    if reference_path:
        reference, ref_tokenizer = load_for_eval(reference_path, device)
        if ref_tokenizer.fingerprint() != tokenizer.fingerprint():
            raise MinilmError(f"{reference_path} uses another tokenizer than {path}; a win-rate "
                              f"compares models of one tokenizer (one speedrun)")
    return evaluate_model(model, tokenizer, cfg, data_dir, reference, cache)
