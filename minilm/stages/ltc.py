"""The LTC stage: instruct on expert demos, then explore -> replay buffer -> L_LM + 0.5 L_PPO (lesson 10).

    minilm ltc --env household --pattern monologue --init runs/sft-tiny/checkpoint --out-dir runs/ltc-hh
    result = run_ltc(ltc_config("tiny", env="math", pattern="analogue", out_dir="runs/ltc-math"))
    result["baseline"], result["ltc"]            # held-out metrics of the IL model and of LTC

Learning through Communication (Wang et al. 2023, arXiv 2310.01444):
  1. instruction fine-tuning on the scripted expert's demonstrations (run_loop; the baseline,
     saved in OUT/il/checkpoint);
  2. a value head on the trunk (`HydraModel(lm, heads=("value",))`, V = tanh(head));
  3. each iteration: (a) explore fresh train seeds with the pattern, sampling; (b) append to the
     replay buffer; (c) one epoch over the newest episodes with L = L_LM + 0.5 L_PPO
     (minilm/agents/ltc_data.py), lr decaying linearly over iterations; (d) evaluate on held-out
     seeds (Monologue, greedy, no teacher; Analogue runs also report success with the solved
     example they trained with); (e) checkpoint weights, heads, optimizer, buffer.
Ablations (`loss`): full, lm, ppo; "no teacher" is pattern monologue. Presets: ci is a smoke test
(seconds), tiny ~2 min, laptop ~2 min (Dialogue on the math environment; lesson 10 has the measurements).

Deviations: full fine-tuning of a 1M-parameter model by default (--lora-r 16 gives the paper's
LoRA); 64 tasks per iteration instead of 256-4096; as in the reference code, each update reads
only the newest iteration's episodes; the teacher is scripted unless --teacher names a checkpoint;
the imitation phase also replays `chat_replay` SFT conversations, so that the agent stays a chat model.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep.instructions import DEFAULT_SOURCES, instruction_examples
from minilm import MinilmError
from minilm.agents.envs import ENVS, make_env
from minilm.agents.ltc_data import LossWeights, collate_episodes, expert_demos, ltc_loss
from minilm.agents.patterns import PATTERNS, SAMPLED, ModelTeacher, RolloutConfig, make_pattern, run_episodes
from minilm.checkpoint import has_train_state, load_checkpoint, save_checkpoint
from minilm.config import ConfigError, Validated, from_preset
from minilm.loop import LoopConfig, OptimConfig, make_optimizer, optimizer_step, run_loop, set_lr, trained_params
from minilm.plots import plot_curves
from minilm.post.base_model import LoRAConfig, init_model
from minilm.post.heads import HydraModel
from minilm.post.sft import make_batch_fn, render_examples, sft_loss
from minilm.resume import restore, write_metrics
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import read_json, write_json

LOSSES = ("full", "lm", "ppo")
EXPLORE_SEED_BASE = 100_000        # demos use train seeds [0, n_demos); exploration starts here


@dataclass
class LTCConfig(Validated):
    out_dir: str = "runs/ltc"       # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    batch_size: int = 16            # episodes per update minibatch
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))   # lesson 10: 1e-4 unlearnt
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r = 0: full fine-tune; r > 0: LoRA, base frozen
    env: str = "household"
    pattern: str = "monologue"
    loss: str = "full"              # ablations: "lm" (LM loss only), "ppo" (PPO only)
    n_demos: int = 400              # expert demonstrations for instruction tuning
    il_steps: int = 150             # 0: cfg.init is already instruction-tuned (ablations share one)
    il_lr: float = 1e-3             # a third of SFT's peak: the start model is already a chat model
    chat_replay: int = 400          # SFT conversations (data_prep/instructions.py) mixed into the IL data,
                                    # so imitation of the environment does not erase chat; 0: the paper's IL
    iterations: int = 6
    episodes_per_iter: int = 64
    rollout_batch: int = 32         # episodes sampled together
    n_test: int = 100               # held-out test seeds
    eval_temperature: float = 0.0   # greedy at test time
    temperature: float = 1.0        # exploration sampling temperature (the PPO ratio is taken at it too)
    max_hints: int = 2
    failed_lm_weight: float = 1e-5
    ppo_coef: float = 0.5
    ent_coef: float = 0.01
    lm_agent_only: bool = False     # not the paper: LM loss on the agent's tokens only, not the teacher's
    whiten_advantages: bool = False  # not the paper: whiten advantages per minibatch (failures can get A > 0)
    teacher: str = ""               # a chat checkpoint as the teacher (ModelTeacher); "": scripted

    def check(self) -> None:
        for name, value, choices in (("env", self.env, ENVS), ("pattern", self.pattern, PATTERNS),
                                     ("loss", self.loss, LOSSES)):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.teacher and self.pattern == "monologue":
            raise ConfigError("--teacher is given but pattern monologue has no teacher; use dialogue or analogue")


LTC_PRESETS = {
    "tiny": dict(),
    # the speedrun's: Dialogue on the math environment (the ladder's harder rungs). Analogue's solved
    # example cost the IL model most of its success here (0.17 -> 0.03); 300 imitation steps instead
    # of 150 took IL from 0.03 to 0.42 held-out success (lesson 10)
    "laptop": dict(env="math", pattern="dialogue", il_steps=300, iterations=3, episodes_per_iter=64, n_test=64),
    "ci": dict(env="math", pattern="analogue", n_demos=32, il_steps=10, chat_replay=16, iterations=1,
               episodes_per_iter=16, rollout_batch=16, batch_size=8, n_test=16),
    "gpu": dict(env="math", pattern="analogue", iterations=6, episodes_per_iter=256, n_test=200),
}
# the fields `minilm ltc --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "env", "pattern", "loss", "n_demos", "il_steps", "il_lr", "iterations",
         "episodes_per_iter", "batch_size", "lr", "n_test", "temperature", "max_hints", "ppo_coef",
         "whiten_advantages", "teacher", "seed", "device", "dtype", "resume")


def ltc_config(preset: str = "tiny", **overrides) -> LTCConfig:
    return from_preset(LTCConfig, LTC_PRESETS, preset, "ltc", **overrides)


def loss_weights(cfg: LTCConfig) -> LossWeights:
    """The ablation as loss coefficients: lm -> no PPO term, ppo -> no LM term."""
    return LossWeights(lm_coef=0.0 if cfg.loss == "ppo" else 1.0,
                       ppo_coef=0.0 if cfg.loss == "lm" else cfg.ppo_coef, ent_coef=cfg.ent_coef,
                       lm_agent_only=cfg.lm_agent_only, whiten_advantages=cfg.whiten_advantages,
                       temperature=cfg.temperature)     # the update's ratio at the rollouts' temperature


def rollout_config(cfg: LTCConfig, temperature: float) -> RolloutConfig:
    return RolloutConfig(temperature=temperature, max_hints=cfg.max_hints)


def collect(model, tok, envs, seeds, pattern, rcfg: RolloutConfig) -> list:
    """Episodes for `seeds`, len(envs) at a time."""
    episodes = []
    for i in range(0, len(seeds), len(envs)):
        chunk = seeds[i:i + len(envs)]
        episodes += run_episodes(model, tok, envs[:len(chunk)], chunk, pattern, rcfg)
    return episodes


def summarize(episodes) -> dict:
    """success (= EM for QA, accuracy for math) and score (F1 for QA) over episodes."""
    n = len(episodes)
    return {"success": sum(ep.success for ep in episodes) / n,
            "score": sum(ep.score for ep in episodes) / n,
            "agent_tokens": sum(sum(w in SAMPLED for w in ep.who) for ep in episodes) / n}


def evaluate(model, tok, test_envs, cfg: LTCConfig, example_env=None) -> dict:
    """Held-out test seeds, the agent alone (Monologue), greedy by default.

    Analogue trains with a solved example in every context, Monologue tests without one: for that
    pattern the same seeds also run with the example (drawn from `example_env`, a train-split env
    no episode steps) as success_with_example / score_with_example, so the shift is measured.
    """
    seeds, rcfg = list(range(cfg.n_test)), rollout_config(cfg, cfg.eval_temperature)
    out = summarize(collect(model, tok, test_envs, seeds, make_pattern("monologue"), rcfg))
    if cfg.pattern == "analogue":
        example_env = example_env if example_env is not None else make_envs(cfg, "train", 1)[0]
        shown = summarize(collect(model, tok, test_envs, seeds, make_pattern("analogue", example_env=example_env),
                                  rcfg))
        out.update(success_with_example=shown["success"], score_with_example=shown["score"])
    return out


def instruction_tune(cfg: LTCConfig, tok, model, env, rt) -> dict:
    """The baseline: SFT on the expert's successful episodes (resumable, in OUT/il)."""
    demos = expert_demos(tok, env, range(cfg.n_demos), model.config.max_seq_len)  # successful ones only
    chats = instruction_examples(cfg.chat_replay, cfg.seed, DEFAULT_SOURCES, split="train") if cfg.chat_replay else []
    replay = render_examples(tok, chats, model.config.max_seq_len) if chats else []
    # its own out_dir: a killed run resumes the imitation phase, and a finished one is not redone
    il = LoopConfig(out_dir=str(Path(cfg.out_dir) / "il"), init=cfg.init, max_steps=cfg.il_steps,
                    eval_every=cfg.il_steps, ckpt_every=cfg.il_steps, device=cfg.device,
                    optim=OptimConfig(lr=cfg.il_lr, warmup_steps=10))
    batch_fn = make_batch_fn(demos + replay, cfg.batch_size, cfg.seed, tok.eot_id, model.config.max_seq_len)
    summary = run_loop(il, model, batch_fn, sft_loss, None, tokenizer=tok, stage="ltc-il", rt=rt)
    return {"n_demos": len(demos), "n_chat_replay": len(replay), "il_final_loss": summary["final_loss"]}


def update(hydra, optimizer, episodes, cfg: LTCConfig, lr: float, rt, seed: int, pad_id: int) -> list[dict]:
    """One epoch over `episodes` in shuffled minibatches; returns one metrics row per minibatch."""
    order = list(range(len(episodes)))
    # seeded per iteration, so a resumed run shuffles exactly as the uninterrupted one
    random.Random(seed).shuffle(order)
    weights, rows = loss_weights(cfg), []
    set_lr(optimizer, lr)
    hydra.train()
    for i in range(0, len(order), cfg.batch_size):
        # (B, T) tokens, attention_mask, agent_mask, old log-probs/values, rewards; (B,) lm_weight
        batch = collate_episodes([episodes[j] for j in order[i:i + cfg.batch_size]], pad_id,
                                 cfg.failed_lm_weight)
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        if batch["agent_mask"].sum() == 0:  # no agent token: nothing to train
            continue
        if weights.ppo_coef == 0 and batch["lm_weight"].max() < 1:
            # the LM loss alone and no successful episode: nothing to imitate. The 1e-5 weight of
            # failures only works next to larger terms; alone, Adam's normalisation would turn it
            # into a full-size step towards the failures.
            continue
        with rt.autocast():
            logits, _, heads = hydra(batch["tokens"], batch["attention_mask"])  # (B, T, V), {value: (B, T)}
            loss, metrics = ltc_loss(logits, heads["value"].tanh(), batch, weights)  # V in [-1, 1], as rewards
        if not torch.isfinite(loss):
            raise MinilmError(f"LTC loss became {loss.item()}; lower --lr")
        loss.backward()
        # the norm over what AdamW updates: LM (or its adapters) and the value head, no frozen base
        metrics["grad_norm"] = optimizer_step(optimizer, trained_params(optimizer), cfg.optim.grad_clip,
                                              "an LTC update")
        rows.append({"loss": loss.item(), **metrics, "batch_tokens": int(batch["attention_mask"].sum())})
    return rows


def _mean_rows(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def _save(ckpt_dir: Path, hydra, tok, optimizer, state: dict, cfg: LTCConfig) -> None:
    # state holds the iteration, the metric rows and the replay buffer; the RNG is reseeded per iteration
    state = {**state, "optimizer": optimizer.state_dict(), "config": asdict(cfg)}
    save_checkpoint(ckpt_dir, hydra.lm, tok, state, meta={"stage": "ltc", "iteration": state["iteration"]},
                    extra={"heads": hydra.heads.state_dict()})


def _resume(ckpt_dir: Path, hydra, optimizer) -> dict:
    ck = load_checkpoint(ckpt_dir, with_train_state=True)
    # LoRA adapters (if any) come back with ck.model
    hydra.lm.load_state_dict(ck.model.state_dict())
    hydra.heads.load_state_dict(ck.extra["heads"])
    state = ck.train_state
    restore(state, optimizer)   # the optimizer; the RNG is reseeded at every iteration instead
    tqdm.write(f"resuming LTC from {ckpt_dir} after iteration {state['iteration']}")
    return state


def make_envs(cfg: LTCConfig, split: str, n: int) -> list:
    return [make_env(cfg.env, split=split) for _ in range(n)]


def instruction_tuned(cfg: LTCConfig, rt) -> tuple:
    """Step 1: (model, tok, train_envs, test_envs, il_summary, baseline metrics), both cached in OUT."""
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    model, tok = init_model(cfg.init, cfg.lora)
    train_envs, test_envs = make_envs(cfg, "train", cfg.rollout_batch), make_envs(cfg, "test", cfg.rollout_batch)
    # il_steps 0: cfg.init is already instruction-tuned (ablations share one)
    il = instruction_tune(cfg, tok, model, train_envs[0], rt) if cfg.il_steps > 0 else {}
    baseline_path = out / "baseline.json"
    # the baseline's eval is cached: resuming or ablating does not re-run it
    if baseline_path.exists():
        baseline = read_json(baseline_path, fix="delete it to evaluate the baseline again")
    else:
        baseline = evaluate(model.to(rt.device), tok, test_envs, cfg)
        out.mkdir(parents=True, exist_ok=True)
        write_json(baseline_path, baseline, indent=None)
    return model, tok, train_envs, test_envs, il, baseline


@one_writer
def run_ltc(cfg: LTCConfig) -> dict:
    """Instruction tuning, then cfg.iterations of explore / buffer / update / evaluate / checkpoint."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    out = Path(cfg.out_dir)
    teacher = ModelTeacher.from_checkpoint(cfg.teacher, rt.device) if cfg.teacher else None   # fail early
    check_settings(cfg, "ltc")   # a rerun into this out_dir must have the same settings
    # 1. instruction tuning on the expert's demonstrations: the baseline
    model, tok, train_envs, test_envs, il, baseline = instruction_tuned(cfg, rt)
    # 2. a value head on the trunk
    hydra = HydraModel(model, heads=("value",)).to(rt.device)
    optimizer = make_optimizer(hydra, cfg.optim)  # one AdamW: LM and value head
    ckpt_dir = out / "checkpoint"
    state = {"iteration": 0, "rows": [], "buffer": []}  # what _save writes and _resume reads
    if cfg.resume and has_train_state(ckpt_dir):
        state = _resume(ckpt_dir, hydra, optimizer)
    example_env = make_envs(cfg, "train", 1)[0]     # Analogue's examples, in training and evaluation
    pattern = make_pattern(cfg.pattern, teacher=teacher, example_env=example_env)
    rcfg = rollout_config(cfg, cfg.temperature)
    for k in tqdm(range(state["iteration"], cfg.iterations), initial=state["iteration"],
                  total=cfg.iterations, desc=f"ltc {cfg.env}/{cfg.pattern}/{cfg.loss}"):
        torch.manual_seed(cfg.seed * 1000 + k)           # resume-exact without saving the RNG
        # 3a-b. explore fresh train tasks, append to the replay buffer
        seeds = list(range(EXPLORE_SEED_BASE + k * cfg.episodes_per_iter,  # fresh: never demo seeds
                           EXPLORE_SEED_BASE + (k + 1) * cfg.episodes_per_iter))
        episodes = collect(hydra, tok, train_envs, seeds, pattern, rcfg)  # sampled at cfg.temperature
        state["buffer"].extend(episodes)
        # 3c. one epoch over the newest episodes; lr decays linearly over the iterations
        lr = cfg.optim.lr * (1.0 - (1.0 - cfg.optim.min_lr_ratio) * k / max(1, cfg.iterations - 1))
        rows = update(hydra, optimizer, episodes, cfg, lr, rt, cfg.seed * 1000 + k, tok.eot_id)
        explored = summarize(episodes)
        trained = sum(r.pop("batch_tokens") for r in rows)  # tokens the update trained on
        so_far = state["rows"][-1].get("tokens", 0) if state["rows"] else 0
        row = {"iteration": k + 1, "tokens": so_far + trained, "lr": lr, "explore_success": explored["success"],
               "explore_score": explored["score"], "buffer": len(state["buffer"]), **_mean_rows(rows)}
        # 3d. held-out evaluation, the agent alone (Analogue: also with the solved example)
        test = evaluate(hydra, tok, test_envs, cfg, example_env)
        row.update(test_success=test["success"], test_score=test["score"],
                   **{f"test_{key}": v for key, v in test.items() if key.endswith("_with_example")})
        state["rows"].append(row)
        state["iteration"] = k + 1
        tqdm.write(f"iter {k + 1}: explore {explored['success']:.3f}  test {test['success']:.3f} "
                   f"(score {test['score']:.3f})  lm {row.get('lm_loss', 0):.3f}")
        # 3e. checkpoint, metrics, curves
        _save(ckpt_dir, hydra, tok, optimizer, state, cfg)
        write_metrics(state["rows"], out, plot=False)   # rows per iteration; curves.png below
        plot_curves(state["rows"], baseline, out / "curves.png", f"LTC {cfg.env} ({cfg.pattern}, {cfg.loss})")
    last = state["rows"][-1]
    result = {"env": cfg.env, "pattern": cfg.pattern, "loss": cfg.loss, **il, "baseline": baseline,
              "ltc": {"success": last["test_success"], "score": last["test_score"],
                      **{key[len("test_"):]: v for key, v in last.items() if key.endswith("_with_example")}},
              "rows": state["rows"], "checkpoint": str(ckpt_dir)}
    write_json(out / "result.json", result, indent=1)
    return result
