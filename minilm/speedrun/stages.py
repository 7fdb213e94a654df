"""The speedrun's stage table (lesson 12): for each stage, how its config is built inside the run
folder, which library function runs it, and the record (stage.json) it leaves.

    configure(run) -> config        the stage's own dataclass from its preset named like the speedrun
                                    preset (ci, laptop, gpu), the paths of the run folder, and --set
    execute(run, config) -> (result, checkpoint or None)    calls the function that the stage's
                                    `minilm <stage>` command calls, nothing else

A value comes from one of three places: the field's default, the stage preset named like the
speedrun preset, or `--set stage.field=value`. minilm/speedrun/run.py runs the stages in order;
nothing here implements a method.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data_prep.pipeline import pipeline_config, run_pipeline
from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.config import get_preset
from minilm.eval.ladder import ladder_gains
from minilm.memory import needs_fsdp, plan_for_stage
from minilm.eval.suite import evaluate_checkpoint, suite_config
from minilm.speedrun.report import write_report
from minilm.stages.dno import dno_config, run_dno
from minilm.stages.dpo import dpo_config, run_dpo
from minilm.stages.hydra_sft import hydra_sft_config, run_hydra_sft
from minilm.stages.ltc import ltc_config, run_ltc
from minilm.stages.ppo import ppo_config, run_ppo
from minilm.stages.pretrain import train, train_config
from minilm.stages.prune import prune_config, run_prune
from minilm.stages.sft import run_sft, sft_config
from minilm.weights import read_json, write_json

# speedrun preset -> the model preset it trains. Every stage has a preset of the same name.
SPEEDRUN_PRESETS = {"ci": "tiny", "laptop": "tiny", "gpu": "small"}
EVALUATED = ("pretrain", "sft", "dpo", "hydra-sft", "ppo", "dno", "ltc", "prune")


@dataclass
class SpeedrunConfig:
    preset: str = "laptop"          # ci: every stage at toy sizes; laptop: results worth reading; gpu
    out_dir: str = ""               # "": runs/speedrun-<preset>
    only: str = ""                  # comma-separated stages to (re-)run alone; "": the whole pipeline
    device: str = "auto"
    dtype: str = "auto"             # auto (bf16 where the chip has it natively), bf16, fp32: every stage
    dry_run: bool = False           # print each stage's config and stop
    overrides: dict = field(default_factory=dict)  # {stage: {field: value}} from --set

    def __post_init__(self):
        if self.preset not in SPEEDRUN_PRESETS:
            raise MinilmError(f"unknown speedrun preset {self.preset!r}; choose one of "
                              f"{', '.join(SPEEDRUN_PRESETS)}")
        self.out_dir = self.out_dir or f"runs/speedrun-{self.preset}"
        bad = [s for s in self.only_stages() if s not in STAGES]
        if bad:
            raise MinilmError(f"unknown stage(s) {', '.join(bad)} in --only; the stages are {', '.join(STAGES)}")

    def only_stages(self) -> list[str]:
        return [s.strip() for s in self.only.split(",") if s.strip()]


class Run:
    """One speedrun folder: where each stage writes, and what its finished stages recorded."""

    def __init__(self, cfg: SpeedrunConfig):
        self.cfg, self.root = cfg, Path(cfg.out_dir)
        self.model_preset = SPEEDRUN_PRESETS[cfg.preset]

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def record(self, stage: str) -> dict | None:
        path = self.dir(stage) / "stage.json"
        # None: not finished
        return read_json(path, fix=f"delete {path} to run the stage again") if path.exists() else None

    def checkpoint(self, stage: str) -> str:
        """The checkpoint a finished stage left (its planned path when planning a dry run)."""
        rec = self.record(stage)
        if rec is not None and rec.get("checkpoint"):
            # recorded relative to the run folder, so a copied or moved run reads its own checkpoints
            path = Path(rec["checkpoint"])
            here = path if path.is_absolute() else self.root / path
            return str(here if here.exists() or not path.exists() else path)   # (older records: cwd-relative)
        return str(self.dir(stage) / "checkpoint")

    def overrides(self, stage: str) -> dict:
        return self.cfg.overrides.get(stage, {})

    def post(self, stage: str, init: str, make_config: Callable):
        """A post-training stage's config: its preset named like the speedrun's, its folder in the run,
        the checkpoint that stage `init` left, and the --set overrides."""
        cfg = make_config(self.cfg.preset, out_dir=str(self.dir(stage)), init=self.checkpoint(init),
                          device=self.cfg.device, **self.overrides(stage))
        if hasattr(cfg, "dtype") and "dtype" not in self.overrides(stage):   # PPO keeps float32
            cfg.dtype = self.cfg.dtype
        return cfg


# ---- configure(run) -> config, execute(run, config) -> (result, checkpoint or None) ----

def data_stage(run: Run):
    vocab_size = get_preset(run.model_preset).vocab_size
    return pipeline_config(run.cfg.preset, out=str(run.dir("data")), vocab_size=vocab_size,
                           **run.overrides("data"))


def run_data(run: Run, cfg) -> tuple[dict, None]:
    manifest = run_pipeline(cfg)
    return {"phases": manifest["phases"], "corpus_fingerprint": manifest["corpus_fingerprint"]}, None


def pretrain_stage(run: Run):
    data = run.dir("data")
    cfg = train_config(run.cfg.preset, out_dir=str(run.dir("pretrain")), data_dir=str(data / "phase1"),
                       phase2_dir=str(data / "phase2"), device=run.cfg.device, dtype=run.cfg.dtype,
                       **run.overrides("pretrain"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.cuda.is_available() and "fsdp" not in run.overrides("pretrain"):
        # DDP while a full replica fits a GPU with room to spare, FSDP when the memory plan says not
        plan = plan_for_stage(cfg, get_preset(cfg.preset, **cfg.model), world)
        cfg.fsdp = needs_fsdp(plan, torch.cuda.get_device_properties(0).total_memory)
    return cfg


def run_pretrain(run: Run, cfg) -> tuple[dict, str | None]:
    summary = train(cfg)  # under torchrun every rank trains; rank 0 alone has the metrics
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every step reads exactly this many tokens over all ranks, so the count needs no log
    summary["tokens"] = cfg.max_steps * cfg.grad_accum * world * cfg.batch_size * cfg.seq_len
    # only rank 0 evaluates and saves: the other ranks return no val_loss and report no checkpoint
    return summary, summary["checkpoint"] if summary.get("val_loss") is not None else None


def _calls(run_stage: Callable, checkpoint: Callable[[dict], str] = lambda r: r["checkpoint"]):
    """execute(run, cfg) for a post-training stage: run_stage(cfg), and where its checkpoint is."""
    def execute(run: Run, cfg) -> tuple[dict, str]:
        result = run_stage(cfg)
        return result, checkpoint(result)
    return execute


def _pruned(result: dict) -> str:  # the compacted model: the one that is actually smaller and faster
    return result["compact"]["path"] if result.get("compact") else result["masked_checkpoint"]


def eval_stage(run: Run):
    return suite_config(run.cfg.preset, **run.overrides("eval"))


def run_eval(run: Run, cfg) -> tuple[dict, None]:
    """The suite on every finished stage's model, against the SFT model; OUT/eval.json grows one row
    per model (a killed eval continues), and a row is recomputed when its checkpoint changed."""
    path, stamps_path = run.root / "eval.json", run.dir("eval") / "stamps.json"
    redo = "delete it to evaluate every model again"
    rows = read_json(path, fix=redo) if path.exists() else {}
    stamps = read_json(stamps_path, fix=redo) if stamps_path.exists() else {}
    cache: dict = {}  # the SFT model's replies, computed once for every win-rate
    for stage in EVALUATED:
        if run.record(stage) is None:
            continue  # the report lists it as missing
        ckpt = run.checkpoint(stage)
        stamp = f"{ckpt}@{_mtime(Path(ckpt))}"  # changes when the stage is re-run
        if stamps.get(stage) == stamp and stage in rows:
            continue
        tqdm.write(f"  evaluating {stage}: {ckpt}")
        rows[stage] = evaluate_checkpoint(ckpt, cfg, run.dir("data") / "phase1",
                                          reference_path=run.checkpoint("sft"), cache=cache)
        stamps[stage] = stamp
        write_json(path, rows)
        write_json(stamps_path, stamps)  # after the row: a killed eval redoes at most one
    rows = ladder_gains({s: rows[s] for s in EVALUATED if s in rows})   # paired, against SFT's items
    write_json(path, rows)
    return {"evaluated": [s for s in EVALUATED if s in rows], "suite": asdict(cfg)}, None


def report_stage(run: Run):
    return {"title": f"minilm speedrun, preset {run.cfg.preset}", **run.overrides("report")}


def run_report(run: Run, cfg: dict) -> tuple[dict, None]:
    return {"report": str(write_report(run.root, tuple(STAGES), title=cfg["title"]))}, None


@dataclass(frozen=True)
class Stage:
    title: str
    needs: tuple[str, ...]                      # stages whose outputs this one reads
    configure: Callable[[Run], object]
    execute: Callable[[Run, object], tuple[dict, str | None]]


STAGES: dict[str, Stage] = {
    "data": Stage("data pipeline: filtered real text + synthetic", (), data_stage, run_data),
    "pretrain": Stage("two-phase pretraining", ("data",), pretrain_stage, run_pretrain),
    "sft": Stage("chat SFT", ("pretrain",), lambda run: run.post("sft", "pretrain", sft_config), _calls(run_sft)),
    "dpo": Stage("DPO + NLL", ("sft",), lambda run: run.post("dpo", "sft", dpo_config), _calls(run_dpo)),
    "hydra-sft": Stage("Hydra-SFT: LM + reward head", ("sft",),
                       lambda run: run.post("hydra-sft", "sft", hydra_sft_config), _calls(run_hydra_sft)),
    "ppo": Stage("Hydra-PPO", ("hydra-sft",), lambda run: run.post("ppo", "hydra-sft", ppo_config), _calls(run_ppo)),
    "dno": Stage("DNO iterations", ("sft",), lambda run: run.post("dno", "sft", dno_config),
                 _calls(run_dno, lambda r: r["best_checkpoint"])),
    "ltc": Stage("LTC on math", ("sft",), lambda run: run.post("ltc", "sft", ltc_config), _calls(run_ltc)),
    "prune": Stage("GUM pruning, 50% of FFN neurons", ("sft",), lambda run: run.post("prune", "sft", prune_config),
                   _calls(run_prune, _pruned)),
    "eval": Stage("evaluation suite on every model", ("sft",), eval_stage, run_eval),
    "report": Stage("report.md + plots", (), report_stage, run_report),
}


# ---- records -------------------------------------------------------------------------------------

def _mtime(path: Path) -> float:
    config = path / "config.json"
    return config.stat().st_mtime if config.exists() else 0.0  # config.json is rewritten by every save


def _tokens(stage_dir: Path) -> int | None:
    """Tokens the stage trained on: the "tokens" count of the last row of each metrics.jsonl under it
    (the post-training loop and PPO log a running count; DNO has one folder per iteration)."""
    total, found = 0, False
    for path in sorted(stage_dir.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and "tokens" in rows[-1]:
            total, found = total + int(rows[-1]["tokens"]), True  # a running count: the last row is the total
    return total if found else None


def _parameters(ckpt: str | None, stage_dir: Path) -> tuple[int | None, int | None]:
    """(parameters of the stage's model, parameters its optimizer trained): the second is counted from
    AdamW's state (one exp_avg per trained tensor), so LoRA stages report only the adapters and heads."""
    if ckpt is None:
        return None, None
    params = load_checkpoint(ckpt).model.num_params()
    # the checkpoint's own train state, else the stage's checkpoint (the compact pruned model has none)
    for state_path in (Path(ckpt) / "train_state.pt", stage_dir / "checkpoint" / "train_state.pt"):
        if state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            adam = state.get("optimizer", {}).get("state", {})
            return params, sum(s["exp_avg"].numel() for s in adam.values() if "exp_avg" in s)
    return params, None


def stage_record(run: Run, name: str, title: str, seconds: float, result: dict, ckpt: str | None,
                 resumed: bool) -> dict:
    """What OUT/<name>/stage.json holds: time, tokens, parameters, the stage's result, its plots."""
    stage_dir = run.dir(name)
    params, trainable = _parameters(ckpt, stage_dir)
    tokens = result["tokens"] if isinstance(result.get("tokens"), int) else _tokens(stage_dir)
    plots = sorted(str(p.relative_to(run.root)) for p in stage_dir.rglob("*.png"))
    return {"stage": name, "title": title, "preset": run.cfg.preset, "seconds": round(seconds, 1), "resumed": resumed,
            "tokens": tokens, "params": params, "trainable_params": trainable,
            "checkpoint": os.path.relpath(ckpt, run.root) if ckpt else None,
            "result": json.loads(json.dumps(result, default=str)), "plots": plots}  # JSON-safe
