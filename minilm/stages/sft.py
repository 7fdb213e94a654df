"""The SFT stage: chat fine-tuning on the assistant tokens, measured before and after (lesson 06).

    minilm sft --init runs/tiny/checkpoint --out-dir runs/sft-tiny           # CPU, ~4 minutes
    minilm sft --init runs/tiny/checkpoint --text-mix 0                      # pure SFT: no replay
    minilm sft --init runs/tiny/checkpoint --out-dir runs/sft-lora --lora-r 8
    torchrun --nproc_per_node 8 -m minilm sft --preset small --fsdp          # data parallel, sharded

    summary = run_sft(sft_config("tiny", init="runs/tiny/checkpoint"))
    summary["before"]["end_rate"], summary["after"]["end_rate"]

Phi-3's post-training starts with SFT on chat-formatted data (arXiv 2404.14219, section 3). Ours
is data_prep/instructions.py's conversations in Phi-3's format (minilm/post/chat.py):
  1. load cfg.init; with cfg.lora.r > 0 wrap its linear layers with LoRA, base frozen;
  2. render the conversations to (ids, loss_mask); a batch is a pure function of (seed, step);
  3. judge greedy replies to the held-out prompts BEFORE training (AnswerOracle);
  4. train with `sft_loss` in minilm/loop.py's run_loop: cross-entropy on the assistant tokens
     plus text_mix x the next-token loss on windows of the pretraining text (replay); with --fsdp
     under torchrun each rank takes its micro-batches of every step, the model sharded (FSDP2);
  5. judge again AFTER; save the checkpoint with both measurements and eval.json.

Deviations: no multi-turn, safety or identity data and far less data; the clean-text replay
(InstructGPT's "pretraining mix", arXiv 2203.02155), which the Phi-3 report does not describe,
keeps SFT from wrecking the language model (lesson 06, "SFT forgets text"); padding, not packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from data_prep.prepare import default_data
from minilm import MinilmError
from minilm.checkpoint import read_train_state
from minilm.config import Validated, from_preset
from minilm.data import TokenDataset
from minilm.fsdp import micro_batches, sharded_run
from minilm.loop import OptimConfig, run_loop
from minilm.post.base_model import LoRAConfig, init_model
from minilm.post.chat import prompts_that_fit
from minilm.post.oracles import AnswerOracle
from minilm.post.sft import clean_text_loss, evaluate_chat, make_batch_fn, render_examples, sft_data, sft_loss
from minilm.run_dir import check_settings, one_writer
from minilm.runtime import setup_runtime
from minilm.weights import read_json, write_json


@dataclass
class SFTConfig(Validated):
    out_dir: str = "runs/sft-tiny"  # checkpoint/, metrics.jsonl and the stage's results
    init: str = "runs/tiny/checkpoint"  # the checkpoint this stage starts from (`minilm train` writes it)
    max_steps: int = 600            # optimizer steps
    batch_size: int = 32            # examples per step
    eval_every: int = 600           # held-out evaluation every N steps (greedy replies are slow: once, at the end)
    ckpt_every: int = 100           # atomic checkpoint (and metrics.jsonl) every N steps
    log_every: int = 10             # a metrics.jsonl row every N steps
    seed: int = 1337                # batches and sampling are pure functions of (seed, step)
    device: str = "auto"            # auto (a GPU when torch sees one), cpu, cuda
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32
    resume: bool = True             # continue from out_dir/checkpoint if it has a train_state
    micro_batches: int = 0          # each step's batch in N micro-batches over all ranks (0: one per rank)
    fsdp: bool = False              # under torchrun: data parallel, weights, gradients and AdamW sharded
    activation_checkpointing: bool = False  # keep each layer's input only; recompute the layer in backward
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # r = 0: full fine-tune; r > 0: LoRA, base frozen
    sources: str = "dictionary,ops1,ops2,ops3,ops4,units,word"  # see data_prep/instructions.py
    n_train: int = 4000             # requested train conversations (fewer if sources run out)
    n_eval: int = 200               # held-out prompts judged before and after
    data_seed: int = 0              # which examples are drawn (train and held-out never overlap)
    max_len: int = 192              # longer conversations are dropped, not cut
    max_new_tokens: int = 96        # reply budget of the greedy eval (worked replies run 15-90 tokens)
    # clean-text replay: every step also takes the next-token loss on pretraining text, weighted
    # text_mix, so that SFT does not destroy language modelling (module docstring, "Replay")
    text_mix: float = 1.0           # weight of the clean-text loss; 0: pure SFT (no replay)
    text_data: str = ""             # prepared shards (train split replayed, val split measured);
                                    # "": the data cfg.init was pretrained on, when findable
    text_batch_size: int = 8        # clean-text windows per step
    text_seq_len: int = 128         # tokens per window (at most the model's max_seq_len)


SFT_PRESETS = {
    "tiny": dict(),  # the defaults: ~1M-param base model, 2 CPU cores, ~4 minutes
    "small": dict(out_dir="runs/sft-small", init="runs/small/checkpoint", max_steps=1500,
                  batch_size=64, lr=3e-4, n_train=20000, eval_every=250, ckpt_every=250),
}
SFT_PRESETS["ci"] = dict(max_steps=60, batch_size=16, n_train=800, n_eval=24, eval_every=60, ckpt_every=60)
# the speedrun's, sized for its 20 minutes: 420 steps (a model with room left for the methods on the
# ladder's middle rungs), 4 replayed windows, and a small judge (the eval stage judges every model)
SFT_PRESETS["laptop"] = dict(max_steps=420, n_eval=50, text_batch_size=4)
SFT_PRESETS["gpu"] = SFT_PRESETS["small"]
# the fields `minilm sft --help` shows; every other field is set with --set FIELD=VALUE
FLAGS = ("init", "out_dir", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every", "ckpt_every",
         "seed", "device", "dtype", "resume", "micro_batches", "fsdp", "lora_r", "lora_alpha", "sources", "n_train",
         "n_eval", "max_len", "text_mix", "text_data")


def sft_config(preset: str = "tiny", **overrides) -> SFTConfig:
    return from_preset(SFTConfig, SFT_PRESETS, preset, "sft", **overrides)


def find_text_data(cfg: SFTConfig, tokenizer) -> Path | None:
    """The clean-text shards for replay and measurement: cfg.text_data, or else the phase-1 data
    cfg.init was pretrained on, as its train_state.pt records it (None when that is not findable:
    e.g. an init that is itself a post-trained checkpoint, or data deleted since)."""
    explicit = bool(cfg.text_data)
    directory = Path(cfg.text_data) if explicit else None
    state_path = Path(cfg.init) / "train_state.pt"
    if directory is None and state_path.exists():
        state = read_train_state(state_path)
        recorded = state.get("train_config")  # only pretraining (minilm/stages/pretrain.py) writes this
        if isinstance(recorded, dict) and recorded.get("data_dir"):
            directory = Path(recorded["data_dir"])
        elif isinstance(recorded, dict):  # "": the default data pipeline's phase 1, never built here
            docs = recorded.get("pipeline_docs_per_source", 0)
            directory = default_data(tokenizer.n_vocab, docs, build=False)[0]
    if directory is None or not (directory / "meta.json").exists():
        if explicit:
            raise MinilmError(f"text_data {cfg.text_data} holds no prepared shards (no meta.json); "
                              f"pass the phase-1 directory of `minilm prepare` / data_prep/pipeline.py")
        return None
    meta = read_json(directory / "meta.json", fix="prepare the data again into a fresh folder")
    fingerprint = meta.get("tokenizer", {}).get("fingerprint")
    if fingerprint != tokenizer.fingerprint():
        if explicit:
            raise MinilmError(f"{directory} was tokenized with another tokenizer than {cfg.init}'s")
        return None
    return directory


@one_writer
def run_sft(cfg: SFTConfig, on_step=None) -> dict:
    """Fine-tune cfg.init on chat data; returns {"before", "after", ...} measured on held-out prompts."""
    rt = setup_runtime(cfg.device, cfg.dtype)    # under torchrun every rank runs the stage; rank 0 writes
    check_settings(cfg, "sft", write=rt.is_main)   # a rerun into this out_dir must have the same settings
    sharded_run(cfg, rt)   # refused early: torchrun without --fsdp, LoRA under FSDP, an uneven batch
    model, tokenizer = init_model(cfg.init, cfg.lora, rt.device)                           # 1.
    if cfg.max_len > model.config.max_seq_len:
        raise MinilmError(f"max_len {cfg.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    train, heldout, train_sample = sft_data(cfg)  # train_sample: n_eval train prompts
    # an eval prompt with no room for its reply is dropped, as over-long training conversations are
    room = model.config.max_seq_len - cfg.max_new_tokens
    heldout, train_sample = (prompts_that_fit(tokenizer, convs, room) for convs in (heldout, train_sample))
    if not heldout:
        raise MinilmError(f"no held-out prompt fits max_new_tokens={cfg.max_new_tokens} in the model's "
                          f"{model.config.max_seq_len} positions; lower --max-new-tokens")
    examples = render_examples(tokenizer, train, cfg.max_len)               # 2.
    if cfg.text_mix < 0:
        raise MinilmError(f"text_mix must be >= 0 (the weight of the clean-text loss), got {cfg.text_mix}")
    text_dir = find_text_data(cfg, tokenizer)
    if cfg.text_mix > 0 and text_dir is None:  # the preset's default must not stop a run: say so, go on
        tqdm.write(f"text replay OFF: {cfg.init} records no pretraining data found on this machine; "
                   f"pass --text-data DIR (prepared shards) to keep text_mix={cfg.text_mix}")
    # replay trains on the train split; text_val below measures forgetting on the val split
    replay = TokenDataset(text_dir, "train") if cfg.text_mix > 0 and text_dir is not None else None
    parts = micro_batches(cfg, rt)[0]   # each micro-batch takes its share of the windows too
    if replay is not None and cfg.text_batch_size % parts:
        raise MinilmError(f"text_batch_size {cfg.text_batch_size} must cut into the {parts} micro-batches "
                          f"of a step; change --set text_batch_size=N or --micro-batches")
    # batch_fn(step): (B, max_len) tokens/targets/attention_mask (+ (B', T') text windows), fixed by (seed, step)
    batch_fn = make_batch_fn(examples, cfg.batch_size, cfg.seed, tokenizer.eot_id, cfg.max_len, replay,
                             cfg.text_batch_size, min(cfg.text_seq_len, model.config.max_seq_len))
    oracle = AnswerOracle(train + heldout)  # knows every question's answer
    text_val = TokenDataset(text_dir, "val") if text_dir is not None else None

    def eval_fn(m) -> dict:  # chat rates, and the held-out clean-text loss when the data is known
        rates = evaluate_chat(m, tokenizer, heldout, oracle, cfg.max_new_tokens)
        return rates if text_val is None else {**rates, "text_val_loss": clean_text_loss(m, text_val)}

    model.eval()
    # the train sample beside the held-out prompts tells memorising apart from generalising
    before = {**eval_fn(model), "train_correct_rate":                        # 3.
              evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}

    # the BEFORE numbers travel in the checkpoint meta
    summary = run_loop(cfg, model, batch_fn, partial(sft_loss, text_mix=cfg.text_mix), eval_fn,   # 4.
                       tokenizer=tokenizer, stage="sft", rt=rt, on_step=on_step,
                       meta={"before": before, "n_train": len(examples), "heldout": len(heldout)})
    model.eval()  # 5. the loop's last held-out eval, plus the train sample (under FSDP on every rank)
    after = {**{k: summary[k] for k in before if k in summary}, "train_correct_rate":
             evaluate_chat(model, tokenizer, train_sample, oracle, cfg.max_new_tokens)["correct_rate"]}
    result = {**summary, "before": before, "after": after, "n_train": len(examples),
              "n_heldout": len(heldout), "text_data": str(text_dir) if text_dir else None,
              "text_mix": cfg.text_mix if replay is not None else 0.0}
    if rt.is_main:
        write_json(Path(cfg.out_dir) / "eval.json", result)
    return result
