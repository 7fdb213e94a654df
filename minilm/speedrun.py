"""`minilm speedrun`: one command from an empty folder to a report card of every stage (issue 10).

    minilm speedrun --preset ci                  # every stage at toy sizes, a few minutes on 2 CPU cores
    minilm speedrun                              # --preset laptop: results worth reading, ~15 min on 2 cores
    torchrun --nproc_per_node 8 -m minilm speedrun --preset gpu    # the same pipeline sized for GPUs
    minilm speedrun --only sft,eval,report       # re-run stages alone (the old folders are kept as .prev)
    minilm speedrun --dry-run                    # print every stage's config and stop

The pipeline; each step is a library function that this file only calls with sizes and paths:

    data       the data pipeline of lesson 05 (filtered real text; its best part + synthetic)
    pretrain   Phi-3-style two-phase pretraining (lesson 03)
    sft        chat SFT (lesson 06)                                 from pretrain
    dpo        DPO + NLL (lesson 07)                                from sft
    hydra-sft  one model with an LM head and a reward head (lesson 08)   from sft
    ppo        Hydra-PPO against its own reward head (lesson 08)    from hydra-sft
    dno        DNO iterations against the verifier (lesson 09)      from sft
    ltc        LTC on the math environment (lesson 10)              from sft
    prune      GUM pruning of half the FFN neurons (lesson 11)      from sft
    eval       one evaluation suite on every stage's model (minilm/eval/suite.py)
    report     OUT/report.md and its plots (minilm/eval/report.py)

Post-training branches from the SFT model instead of chaining DPO -> PPO -> DNO, so every method
starts from the same model and the report's table says what each one bought on its own.

Each stage writes into OUT/<stage>/ and, once it finishes, OUT/<stage>/stage.json (atomically): its
time, tokens, parameters and result. A stage with a stage.json is skipped, so running a killed
speedrun again continues where it stopped; the interrupted stage resumes from its own last
checkpoint, as every loop in minilm does.

Under torchrun, pretraining runs data-parallel on every process (minilm/train.py). The
post-training loops have no DDP (lesson 06 says why), so rank 0 runs them alone and the other
ranks exit after pretraining.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from minilm import MinilmError
from minilm.stages import EVALUATED, STAGES, Stage, stage_record, write_json  # noqa: F401 (re-exported)

# Per preset: the model preset, the stage presets to start from (a stage's own preset of the same
# name first, e.g. LTC's "ci"; then "stage_preset"; then "tiny"), and the sizes each stage's config
# gets on top. "ci" only proves that every stage runs; "laptop" keeps each stage's own defaults,
# the sizes lessons 03-11 measured.
SPEEDRUN_PRESETS: dict[str, dict] = {
    "ci": {
        "model": "tiny", "stage_preset": "tiny",
        "data": dict(limit_per_source=40, synthetic=300, annotate_sample=120),
        "pretrain": dict(max_steps=120, batch_size=8, warmup_steps=10, eval_every=60, ckpt_every=60,
                         eval_batches=4),
        "sft": dict(max_steps=60, batch_size=16, n_train=800, n_eval=24, eval_every=60, ckpt_every=60),
        "dpo": dict(max_steps=12, batch_size=8, n_pairs=200, n_eval_pairs=24, n_judge=16,
                    max_new_tokens=32, eval_every=12, ckpt_every=12),
        "hydra-sft": dict(max_steps=12, batch_size=8, sft_batch_size=8, n_pairs=200, n_train=400,
                          n_eval_pairs=24, n_eval=16, eval_every=12, ckpt_every=12),
        "ppo": dict(max_steps=3, batch_size=8, minibatch_size=4, n_prompts=200, n_eval=8,
                    max_new_tokens=16, eval_every=3, ckpt_every=3),
        "dno": dict(iterations=2, n_prompts=24, samples=3, n_val=16, n_test=24),
        "prune": dict(max_steps=30, prune_warmup=5, prune_final=10, n_train=400, n_eval=32,
                      eval_every=30, ckpt_every=30),
    },
    "laptop": {
        "model": "tiny", "stage_preset": "tiny",
        "data": dict(limit_per_source=400),
    },
    "gpu": {  # never run by us: no GPU was lent to this project (lesson 12, "Where we simplified")
        "model": "small", "stage_preset": "small",
        "data": dict(limit_per_source=None),
        "hydra-sft": dict(max_steps=1000, batch_size=64, n_pairs=20000, n_train=20000),
        "ppo": dict(max_steps=200, batch_size=64, minibatch_size=16, n_prompts=20000, n_eval=256),
        "dno": dict(iterations=3, n_prompts=2000, n_val=500, n_test=1000),
        "ltc": dict(iterations=6, episodes_per_iter=256, n_test=200),
        "prune": dict(max_steps=600, n_train=20000),
    },
}
# What the speedrun fixes whatever the preset: which variant, method, environment it runs.
FIXED = {"ppo": dict(variant="hydra"), "ltc": dict(env="math", pattern="analogue"),
         "prune": dict(method="gum", sparsity=0.5)}


@dataclass
class SpeedrunConfig:
    preset: str = "laptop"
    out_dir: str = ""               # "": runs/speedrun-<preset>
    only: str = ""                  # comma-separated stages to (re-)run alone; "": the whole pipeline
    device: str = "auto"
    dry_run: bool = False           # print each stage's config and stop
    overrides: dict = field(default_factory=dict)  # {stage: {field: value}} on top of the preset

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

    def sizes(self, stage: str) -> dict:
        return {**SPEEDRUN_PRESETS[self.preset].get(stage, {}), **FIXED.get(stage, {}),
                **self.overrides.get(stage, {})}


class Run:
    """One speedrun folder: where each stage writes, and what its finished stages recorded."""

    def __init__(self, cfg: SpeedrunConfig):
        self.cfg, self.root = cfg, Path(cfg.out_dir)
        self.model_preset = SPEEDRUN_PRESETS[cfg.preset]["model"]

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def record(self, stage: str) -> dict | None:
        path = self.dir(stage) / "stage.json"
        return json.loads(path.read_text()) if path.exists() else None

    def checkpoint(self, stage: str) -> str:
        """The checkpoint a finished stage left (its planned path when planning a dry run)."""
        rec = self.record(stage)
        if rec is not None and rec.get("checkpoint"):
            return rec["checkpoint"]
        return str(self.dir(stage) / "checkpoint")

    def post(self, stage: str, init: str, make_config, presets: dict):
        """A post-training stage's config: its named preset, this preset's sizes, its folder, and the
        checkpoint of `init`. The named preset is the first the stage has of: the speedrun preset's
        own name (LTC has "ci" and "laptop"), the speedrun's stage preset, "tiny"."""
        names = (self.cfg.preset, SPEEDRUN_PRESETS[self.cfg.preset]["stage_preset"], "tiny")
        preset = next((n for n in names if n in presets), "tiny")
        return make_config(preset, out_dir=str(self.dir(stage)), init=self.checkpoint(init),
                           device=self.cfg.device, **self.cfg.sizes(stage))


# ---- the driver ----------------------------------------------------------------------------------

@contextmanager
def _single_process():
    """Hide torchrun's variables: rank 0 runs the post-training stages as a plain single process."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _wait_for(path: Path, newer_than: float = 0.0, poll_s: float = 5.0) -> None:
    """Ranks > 0 wait for rank 0's data stage (a record written after `newer_than`). A file, not a
    barrier: building the data can take longer than a collective's timeout."""
    while not (path.exists() and path.stat().st_mtime >= newer_than):
        time.sleep(poll_s)


def _set_aside(stage_dir: Path) -> None:
    """--only re-runs a stage from scratch; its previous folder is kept as <stage>.prev, not deleted."""
    if stage_dir.exists():
        prev = stage_dir.with_name(stage_dir.name + ".prev")
        shutil.rmtree(prev, ignore_errors=True)
        stage_dir.rename(prev)


def _check_needs(run: Run, name: str) -> None:
    missing = [n for n in STAGES[name].needs if run.record(n) is None]
    if missing:
        raise MinilmError(f"stage {name!r} needs {', '.join(missing)}, which has not finished in {run.root}; "
                          f"run `minilm speedrun --preset {run.cfg.preset} --out-dir {run.root}` first")


def configure(run: Run, name: str):
    """The stage's config; a --set field the stage does not have is a clear error."""
    try:
        return STAGES[name].configure(run)
    except TypeError as e:
        raise MinilmError(f"stage {name!r}: {e}; see `minilm speedrun --dry-run` for its fields") from e


def run_stage(run: Run, name: str) -> dict:
    """Run one stage (resuming its own checkpoint if it has one) and write its stage.json."""
    _check_needs(run, name)
    stage_dir = run.dir(name)
    resumed = stage_dir.exists()
    cfg = configure(run, name)
    t0 = time.time()
    result, ckpt = STAGES[name].execute(run, cfg)
    record = stage_record(run, name, STAGES[name].title, time.time() - t0, result, ckpt, resumed)
    write_json(stage_dir / "stage.json", record)
    return record


def plan(cfg: SpeedrunConfig) -> list[tuple[str, object]]:
    """(stage, its config) for every stage this command would run: what --dry-run prints."""
    run = Run(cfg)
    return [(name, configure(run, name)) for name in (cfg.only_stages() or STAGES)]


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    """Every stage in order, skipping finished ones (or exactly the --only stages, from scratch)."""
    run = Run(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    names = cfg.only_stages() or list(STAGES)
    if rank == 0 and cfg.only_stages():
        for name in names:
            _set_aside(run.dir(name))
    records, started, redo = {}, time.time(), bool(cfg.only_stages())
    for i, name in enumerate(names, 1):
        if not redo and run.record(name) is not None:
            records[name] = run.record(name)
            continue
        if rank != 0:  # torchrun: wait for the data, join pretraining, leave the rest to rank 0
            if name == "data":  # with --only, rank 0 may not have set the old record aside yet
                _wait_for(run.dir("data") / "stage.json", newer_than=started if redo else 0.0)
            elif name == "pretrain":
                STAGES[name].execute(run, configure(run, name))
            else:
                break
            continue
        tqdm.write(f"\n[{i}/{len(names)}] {name}: {STAGES[name].title}")
        if name == "pretrain" or world == 1:
            records[name] = run_stage(run, name)
        else:
            with _single_process():
                records[name] = run_stage(run, name)
    return records


def parse_overrides(items: list[str]) -> dict:
    """["sft.max_steps=100", "ltc.env=qa"] -> {"sft": {"max_steps": 100}, "ltc": {"env": "qa"}}
    (values are read as JSON when they parse, else kept as text)."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not (eq and dot and name) or stage not in STAGES:
            raise MinilmError(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE one of "
                              f"{', '.join(STAGES)} (e.g. --set sft.max_steps=100)")
        try:
            out.setdefault(stage, {})[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[stage][name.replace("-", "_")] = value
    return out
