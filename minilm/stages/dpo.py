"""The DPO stage (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), as Phi-3 used it (lesson 07).

    minilm dpo --init runs/sft-tiny/checkpoint --out-dir runs/dpo-tiny          # CPU, ~2 minutes
    minilm dpo --init runs/sft-tiny/checkpoint --lora-r 8                        # reference = LoRA off
    torchrun --nproc_per_node 8 -m minilm dpo --preset small --fsdp          # policy and reference sharded
    result = run_dpo(dpo_config("tiny", init="runs/sft-tiny/checkpoint"))

DPO fits the policy directly to preference pairs; beta * log(pi / ref) is the implicit reward. The
reference is the SFT model, frozen: a deep copy, or with LoRA the same weights with the adapters
switched off (`minilm.lora.lora_disabled`), which costs no memory. The losses are in
minilm/post/dpo.py. One step:
  1. a batch of pairs, chosen and rejected rows in one (2B, T) tensor;
  2. policy log-probs of each reply, reference log-probs under no_grad;
  3. `dpo_batch_loss`, backward, AdamW (minilm/loop.py's run_loop; with --fsdp under torchrun
     each rank takes its micro-batches of pairs, policy and reference both sharded).
Held-out judgement: greedy replies of the DPO model and of the SFT model on held-out prompts,
scored by AnswerOracle (rates and head-to-head preference).
Training pairs: offline checkable pairs (data_prep/instructions.py) or, with --pairs sampled, the
start model's own samples labelled by AnswerOracle (`build_preference_pairs`).

Deviations: reference log-probs recomputed each step (same numbers, simpler); no label smoothing;
no length normalisation, as the paper. The tiny preset adds sft_weight x the NLL of the chosen
replies (DPO + NLL, Iterative RPO, arXiv 2404.19733); --sft-weight 0 is plain DPO.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.instructions import instruction_examples, preference_pairs
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.config import Validated, from_preset
from minilm.fsdp import shard_model, sharded_run
from minilm.loop import OptimConfig, run_loop
from minilm.lora import adapter_names, merge_and_unload
from minilm.post.base_model import LoRAConfig, add_lora
from minilm.post.chat import render_prompt
from minilm.post.dpo import dpo_batch_loss, evaluate_dpo, preferred_rate, summarize
from minilm.post.oracles import AnswerOracle
from minilm.post.preferences import build_preference_pairs, encode_pairs, make_pair_batch_fn, step_end_ids
from minilm.post.sft import greedy_judgements
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import write_json


@dataclass
class DPOConfig(Validated):
    out_dir: str = "runs/dpo-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/sft-tiny/checkpoint"  # the checkpoint this stage starts from
    max_steps: int = 100            # optimizer steps
    batch_size: int = 16            # pairs per step (32 sequences)
    eval_every: int = 50            # held-out evaluation every N steps
    ckpt_every: int = 50            # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    micro_batches: int = 0          # each step's batch in N micro-batches over all ranks (0: one per rank)
    fsdp: bool = False              # under torchrun: data parallel, weights, gradients and AdamW sharded
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the layer in backward
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=10))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r = 0: full fine-tune; r > 0: LoRA, base frozen
    beta: float = 0.1               # strength of the pull towards the reference (KL weight)
    sft_weight: float = 0.0         # > 0: + sft_weight * NLL per token of chosen replies
    credit: str = "reply"           # reply: DPO over the whole replies (the paper); step: up to the end
                                    # of the step where the two replies part (Step-DPO, pair_batch)
    pairs: str = "offline"          # offline: data_prep/instructions.py pairs; sampled: the start
                                    # model's own replies judged by AnswerOracle; both: the union
    n_pairs: int = 3000             # requested offline train pairs
    n_sample_prompts: int = 500     # train prompts to sample replies for ("sampled"/"both")
    n_samples: int = 4              # replies sampled per prompt
    tie_margin: float = 0.25        # sampled pairs with |P(a beats b) - 0.5| <= this are ties, dropped
    n_eval_pairs: int = 200         # held-out pairs for the implicit-reward metrics
    n_judge: int = 200              # held-out prompts for the greedy-reply judgement
    sources: str = "dictionary,ops1,ops2,ops3,ops4,units,word"  # prompt kinds: pairs, samples, judgement
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 160              # longer pairs are dropped, not cut
    max_new_tokens: int = 100       # reply budget of the judgement (worked solutions are ~60-90 tokens)


DPO_PRESETS = {
    # ~1M-param SFT model, 2 CPU cores, ~2 minutes. Measured on the held-out ladder (lesson 07): at
    # SFT's own lr (2e-3) DPO + NLL cost 0.40 of accuracy, at 2e-4 0.09, at 1e-4 0.04; with beta 0.02
    # at 2e-4 it is neutral (+0.01 [-0.02, 0.04]), while the NLL term alone gains +0.05. Plain DPO
    # (sft_weight 0) pushes rejected replies down faster than chosen ones, and its greedy sums go wrong.
    "tiny": dict(lr=2e-4, beta=0.02, sft_weight=1.0, n_judge=100),
    "small": dict(out_dir="runs/dpo-small", init="runs/sft-small/checkpoint", max_steps=800,
                  batch_size=32, lr=1e-4, n_pairs=20000, eval_every=200, ckpt_every=200),
}
DPO_PRESETS["ci"] = dict(DPO_PRESETS["tiny"], lr=2e-3, beta=0.1, max_steps=12, batch_size=8, n_pairs=200,
                         n_eval_pairs=24, n_judge=16, max_new_tokens=32, eval_every=12, ckpt_every=12)
DPO_PRESETS["laptop"] = dict(DPO_PRESETS["tiny"], max_steps=80, n_judge=64)   # the speedrun's 20 minutes
DPO_PRESETS["gpu"] = DPO_PRESETS["small"]
# the fields `minilm dpo --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every",
         "seed", "device", "dtype", "resume", "fsdp", "lora_r", "beta", "sft_weight", "pairs",
         "n_pairs", "n_samples", "n_eval_pairs", "n_judge", "max_len", "max_new_tokens")


def dpo_config(preset: str = "tiny", **overrides) -> DPOConfig:
    return from_preset(DPOConfig, DPO_PRESETS, preset, "dpo", **overrides)


def load_policy(cfg: DPOConfig, device):
    """(policy, reference or None, tokenizer): the reference is a frozen copy of the start model,
    or None under LoRA, where the policy with its adapters off IS the start model."""
    ck = load_checkpoint(cfg.init, device=device)
    if ck.tokenizer is None:
        raise MinilmError(f"{cfg.init} has no tokenizer; DPO needs one to render chats")
    model = ck.model
    if adapter_names(model):  # an SFT-with-LoRA checkpoint: fold it, so "LoRA off" means the SFT model
        merge_and_unload(model).requires_grad_(True)
    if cfg.lora.r > 0:
        add_lora(cfg.lora, model)  # base frozen, adapters trainable
        # no copy: lora_disabled(policy) computes the start model's log-probs, at no extra memory
        return model, None, ck.tokenizer
    # full fine-tune: a frozen copy, in eval mode so dropout never perturbs the reference log-probs
    return model, copy.deepcopy(model).requires_grad_(False).eval(), ck.tokenizer


def train_pairs(cfg: DPOConfig, model, tokenizer) -> list[dict]:
    """The training pairs cfg.pairs asks for: offline, sampled from `model` (on-policy), or both."""
    if cfg.pairs not in ("offline", "sampled", "both"):
        raise MinilmError(f"pairs must be offline, sampled or both, not {cfg.pairs!r}")
    sources = tuple(s.strip() for s in cfg.sources.split(",") if s.strip())
    pairs = (preference_pairs(cfg.n_pairs, cfg.data_seed, sources, split="train") if cfg.pairs != "sampled"
             else [])
    if cfg.pairs != "offline":
        convs = instruction_examples(cfg.n_sample_prompts, cfg.data_seed, sources, split="train")
        room = model.config.max_seq_len - cfg.max_new_tokens  # a prompt must leave room for a reply
        prompts = [c["messages"][:-1] for c in convs
                   if len(render_prompt(tokenizer, c["messages"][:-1])) <= room]
        model.eval()
        # on-policy pairs: n_samples replies per prompt at T=1, every two of them judged by the oracle, ties dropped
        pairs += build_preference_pairs(model, tokenizer, prompts, AnswerOracle(convs), cfg.n_samples,
                                        cfg.max_new_tokens, temperature=1.0, tie_margin=cfg.tie_margin,
                                        seed=cfg.data_seed)
    if not pairs:
        raise MinilmError("no training pairs: every sampled pair was a tie; raise --n-samples or use "
                          "offline pairs")
    return pairs


def dpo_data(cfg: DPOConfig, model, tokenizer):
    """(train encoded pairs, held-out encoded pairs, held-out judgement conversations, oracle)."""
    train, _ = encode_pairs(tokenizer, train_pairs(cfg, model, tokenizer), cfg.max_len)  # pairs over max_len dropped
    heldout_pairs = preference_pairs(cfg.n_eval_pairs, cfg.data_seed + 1, split="heldout")
    heldout, _ = encode_pairs(tokenizer, heldout_pairs, cfg.max_len)
    # data_seed + 2: other held-out prompts than the eval pairs' (data_seed + 1)
    judge = instruction_examples(cfg.n_judge, cfg.data_seed + 2, tuple(cfg.sources.split(",")), split="heldout")
    room = model.config.max_seq_len - cfg.max_new_tokens  # prompts that leave room for a full reply
    judge = [c for c in judge if len(render_prompt(tokenizer, c["messages"][:-1])) <= room]
    if not judge:
        raise MinilmError(f"no held-out prompt fits in max_seq_len - max_new_tokens = {room} tokens")
    return train, heldout, judge, AnswerOracle(judge)


@one_writer
def run_dpo(cfg: DPOConfig, on_step=None) -> dict:
    """DPO from cfg.init; returns implicit-reward metrics and the held-out judgement before/after."""
    rt = setup_runtime(cfg.device, cfg.dtype)    # under torchrun every rank runs the stage; rank 0 writes
    check_settings(cfg, "dpo", write=rt.is_main)   # a rerun into this out_dir must have the same settings
    if cfg.beta <= 0 or cfg.sft_weight < 0:
        raise MinilmError(f"beta must be > 0 and sft_weight >= 0 (got {cfg.beta}, {cfg.sft_weight})")
    if cfg.pairs not in ("offline", "sampled", "both"):
        raise MinilmError(f"pairs must be offline, sampled or both, not {cfg.pairs!r}")
    if cfg.credit not in ("reply", "step"):
        raise MinilmError(f"credit must be reply or step, not {cfg.credit!r}")
    sharded = sharded_run(cfg, rt)   # refused early: torchrun without --fsdp, LoRA under FSDP, an uneven batch
    torch.manual_seed(cfg.seed)     # LoRA's A matrices start the same on every run and resume
    policy, reference, tokenizer = load_policy(cfg, rt.device)
    if cfg.max_len > policy.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len "
                          f"{policy.config.max_seq_len}")
    # sampled pairs come from the start model (under LoRA: the policy, whose fresh adapters add exactly 0)
    train, heldout, judge, oracle = dpo_data(cfg, reference if reference is not None else policy, tokenizer)
    pad = tokenizer.eot_id
    step_ends = step_end_ids(tokenizer) if cfg.credit == "step" else ()
    # batch_fn(step): (2B, T) ids, B chosen rows then their B rejected twins; fixed by (seed, step)
    batch_fn = make_pair_batch_fn(train, cfg.batch_size, cfg.seed, pad, cfg.max_len, step_ends)
    # judge the start model BEFORE training: the baseline the DPO model's replies are compared with
    sft_model = reference if reference is not None else policy
    sft_model.eval()
    sft_judged = greedy_judgements(sft_model, tokenizer, judge, oracle, cfg.max_new_tokens)  # the SFT model

    # 1. the (2B, T) batch; 2. (2B,) summed reply log-probs, the reference's under no_grad (no gradient
    # may reach it: it anchors the implicit reward); 3. the DPO loss, backward and AdamW in run_loop
    def loss_fn(model, batch):
        return dpo_batch_loss(model, batch, cfg.beta, reference, cfg.sft_weight)

    # held-out DPO loss, reward accuracy and margins: every held-out pair once
    def eval_fn(model):
        return evaluate_dpo(model, heldout, pad, cfg.max_len, cfg.beta, reference, step_ends)

    if sharded:
        # The reference is sharded like the policy (1/W of its weights per rank), not kept whole on
        # every rank: in the models FSDP is for, a full frozen copy per GPU costs what sharding saves.
        # Its forward all-gathers each layer, as the policy's does; every rank runs it in lockstep.
        shard_model(reference, rt)
    summary = run_loop(cfg, policy, batch_fn, loss_fn, eval_fn, tokenizer=tokenizer, stage="dpo", rt=rt,
                       on_step=on_step, meta={"beta": cfg.beta})
    policy.eval()
    # the same held-out prompts AFTER; dpo_vs_sft compares the two sets of replies head to head
    dpo_judged = greedy_judgements(policy, tokenizer, judge, oracle, cfg.max_new_tokens)
    result = {**summary, "sft": summarize(sft_judged, judge), "dpo": summarize(dpo_judged, judge),
              "dpo_vs_sft": preferred_rate(dpo_judged, sft_judged), "n_train_pairs": len(train),
              "n_heldout_pairs": len(heldout), "n_judge": len(judge)}
    if rt.is_main:
        write_json(Path(cfg.out_dir) / "eval.json", result)
    return result
