"""The speedrun's stages (lesson 12): for each, how its config is built inside the run folder, how
it is executed, and the record (stage.json) it leaves.

    configure(run) -> config        the stage's own dataclass: its named preset, the speedrun
                                    preset's sizes (run.cfg.sizes), paths in the run folder (Run.post)
    execute(run, config) -> (result, checkpoint or None)    calls the library function that the
                                    stage's `minilm <stage>` command calls, nothing else

minilm/speedrun.py runs them in order; nothing here implements a method.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tqdm import tqdm

if TYPE_CHECKING:
    from minilm.speedrun import Run

# ---- the stages: configure(run) -> config, execute(run, config) -> (result, checkpoint or None) ----

def data_stage(run: Run):
    from data_prep.pipeline import PipelineConfig
    from minilm.config import get_preset
    return PipelineConfig(out=str(run.dir("data")), vocab_size=get_preset(run.model_preset).vocab_size,
                          **run.cfg.sizes("data"))


def run_data(run: Run, cfg) -> tuple[dict, None]:
    from data_prep.pipeline import run_pipeline
    return {"phases": run_pipeline(cfg)["phases"]}, None


def pretrain_stage(run: Run):
    from minilm.train import train_config
    data = run.dir("data")
    return train_config(run.model_preset, out_dir=str(run.dir("pretrain")), data_dir=str(data / "phase1"),
                        phase2_dir=str(data / "phase2"), device=run.cfg.device, **run.cfg.sizes("pretrain"))


def run_pretrain(run: Run, cfg) -> tuple[dict, str | None]:
    from minilm.train import train
    summary = train(cfg)  # under torchrun every rank trains; rank 0 alone has the metrics
    world = int(os.environ.get("WORLD_SIZE", "1"))
    summary["tokens"] = cfg.max_steps * cfg.grad_accum * world * cfg.batch_size * cfg.seq_len
    return summary, summary["checkpoint"] if summary.get("val_loss") is not None else None


def sft_stage(run: Run):
    from minilm.post.sft import SFT_PRESETS, sft_config
    return run.post("sft", "pretrain", sft_config, SFT_PRESETS)


def dpo_stage(run: Run):
    from minilm.post.dpo import DPO_PRESETS, dpo_config
    return run.post("dpo", "sft", dpo_config, DPO_PRESETS)


def hydra_sft_stage(run: Run):
    from minilm.post.hydra import HYDRA_SFT_PRESETS, hydra_sft_config
    return run.post("hydra-sft", "sft", hydra_sft_config, HYDRA_SFT_PRESETS)


def ppo_stage(run: Run):
    from minilm.post.ppo_loop import PPO_PRESETS, ppo_config
    return run.post("ppo", "hydra-sft", ppo_config, PPO_PRESETS)


def dno_stage(run: Run):
    from minilm.post.dno_loop import DNO_PRESETS, dno_config
    return run.post("dno", "sft", dno_config, DNO_PRESETS)


def ltc_stage(run: Run):
    from minilm.agents.ltc import LTC_PRESETS, ltc_config
    return run.post("ltc", "sft", ltc_config, LTC_PRESETS)


def prune_stage(run: Run):
    from minilm.prune.apply import prune_config
    return run.post("prune", "sft", lambda preset, **fields: prune_config(**fields), {})  # no presets


def _calls(func_name: str, module: str, checkpoint: Callable[[dict], str]):
    """execute(run, cfg) for a post-training stage: call module.func_name(cfg), find its checkpoint."""
    def execute(run: Run, cfg) -> tuple[dict, str]:
        import importlib
        result = getattr(importlib.import_module(module), func_name)(cfg)
        return result, checkpoint(result)
    return execute


def _final(result: dict) -> str:
    return result["checkpoint"]


def _pruned(result: dict) -> str:  # the compacted model: the one that is actually smaller and faster
    return result["compact"]["path"] if result.get("compact") else result["masked_checkpoint"]


def eval_stage(run: Run):
    from minilm.eval.suite import suite_config
    return suite_config(run.cfg.preset, **run.cfg.sizes("eval"))


def run_eval(run: Run, cfg) -> tuple[dict, None]:
    """The suite on every finished stage's model, against the SFT model; OUT/eval.json grows one row
    per model (a killed eval continues), and a row is recomputed when its checkpoint changed."""
    from minilm.eval.suite import evaluate_checkpoint
    path, stamps_path = run.root / "eval.json", run.dir("eval") / "stamps.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    stamps = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
    cache: dict = {}  # the SFT model's replies, computed once for every win-rate
    for stage in EVALUATED:
        if run.record(stage) is None:
            continue  # the report lists it as missing
        ckpt = run.checkpoint(stage)
        stamp = f"{ckpt}@{_mtime(Path(ckpt))}"
        if stamps.get(stage) == stamp and stage in rows:
            continue
        tqdm.write(f"  evaluating {stage}: {ckpt}")
        rows[stage] = evaluate_checkpoint(ckpt, cfg, run.dir("data") / "phase1",
                                          reference_path=run.checkpoint("sft"), cache=cache)
        stamps[stage] = stamp
        write_json(path, rows)
        write_json(stamps_path, stamps)
    return {"evaluated": [s for s in EVALUATED if s in rows], "suite": asdict(cfg)}, None


def report_stage(run: Run):
    return {"title": f"minilm speedrun, preset {run.cfg.preset}"}


def run_report(run: Run, cfg: dict) -> tuple[dict, None]:
    from minilm.eval.report import write_report
    return {"report": str(write_report(run.root, title=cfg["title"]))}, None


@dataclass(frozen=True)
class Stage:
    title: str
    needs: tuple[str, ...]                      # stages whose outputs this one reads
    configure: Callable[[Run], object]
    execute: Callable[[Run, object], tuple[dict, str | None]]


STAGES: dict[str, Stage] = {
    "data": Stage("data pipeline: filtered real text + synthetic", (), data_stage, run_data),
    "pretrain": Stage("two-phase pretraining", ("data",), pretrain_stage, run_pretrain),
    "sft": Stage("chat SFT", ("pretrain",), sft_stage, _calls("run_sft", "minilm.post.sft", _final)),
    "dpo": Stage("DPO + NLL", ("sft",), dpo_stage, _calls("run_dpo", "minilm.post.dpo", _final)),
    "hydra-sft": Stage("Hydra-SFT: LM + reward head", ("sft",), hydra_sft_stage,
                       _calls("run_hydra_sft", "minilm.post.hydra", _final)),
    "ppo": Stage("Hydra-PPO", ("hydra-sft",), ppo_stage, _calls("run_ppo", "minilm.post.ppo_loop", _final)),
    "dno": Stage("DNO iterations", ("sft",), dno_stage,
                 _calls("run_dno", "minilm.post.dno_loop", lambda r: r["best_checkpoint"])),
    "ltc": Stage("LTC on math", ("sft",), ltc_stage, _calls("run_ltc", "minilm.agents.ltc", _final)),
    "prune": Stage("GUM pruning, 50% of FFN neurons", ("sft",), prune_stage,
                   _calls("run_prune", "minilm.prune.apply", _pruned)),
    "eval": Stage("evaluation suite on every model", ("sft",), eval_stage, run_eval),
    "report": Stage("report.md + plots", (), report_stage, run_report),
}
EVALUATED = ("pretrain", "sft", "dpo", "hydra-sft", "ppo", "dno", "ltc", "prune")


# ---- records -------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _mtime(path: Path) -> float:
    config = path / "config.json"
    return config.stat().st_mtime if config.exists() else 0.0


def _tokens(stage_dir: Path) -> int | None:
    """Tokens the stage trained on: the "tokens" count of the last row of each metrics.jsonl under it
    (the post-training loop and PPO log a running count; DNO has one folder per iteration)."""
    total, found = 0, False
    for path in sorted(stage_dir.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and "tokens" in rows[-1]:
            total, found = total + int(rows[-1]["tokens"]), True
    return total if found else None


def _parameters(ckpt: str | None, stage_dir: Path) -> tuple[int | None, int | None]:
    """(parameters of the stage's model, parameters its optimizer trained): the second is counted from
    AdamW's state (one exp_avg per trained tensor), so LoRA stages report only the adapters and heads."""
    if ckpt is None:
        return None, None
    import torch

    from minilm.checkpoint import load_checkpoint
    params = load_checkpoint(ckpt).model.num_params()
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
            "tokens": tokens, "params": params, "trainable_params": trainable, "checkpoint": ckpt,
            "result": json.loads(json.dumps(result, default=str)), "plots": plots}
