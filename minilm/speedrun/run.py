"""`minilm speedrun`: one command from an empty folder to a report card of every stage (lesson 12).

    minilm speedrun --preset ci                  # every stage at toy sizes, a few minutes on 2 CPU cores
    minilm speedrun                              # --preset laptop: results worth reading, ~18-20 min on 2 cores
    torchrun --nproc_per_node 8 -m minilm speedrun --preset gpu    # the same pipeline sized for GPUs
    minilm speedrun --only sft,eval,report       # re-run stages alone (the old folders are kept as .prev)

The driver: it runs the stage table of minilm/speedrun/stages.py in order (data, pretrain, sft,
dpo, hydra-sft, ppo, dno, ltc, prune, eval, report). Each stage is a library function called with
sizes and paths; post-training branches from the SFT model instead of chaining DPO -> PPO -> DNO,
so the report says what each method bought on its own.

Each stage writes into OUT/<stage>/ and, once it finishes, OUT/<stage>/stage.json (atomically): its
time, tokens, parameters and result. A stage with a stage.json is skipped, so running a killed
speedrun again continues where it stopped; the interrupted stage resumes from its own last
checkpoint, as every loop in minilm does.

Under torchrun, pretraining runs data-parallel on every process (minilm/stages/pretrain.py). The
post-training loops have no DDP (lesson 06 says why), so rank 0 runs them alone and the other
ranks exit after pretraining.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from minilm import MinilmError
from minilm.run_dir import writer_lock
from minilm.speedrun.stages import STAGES, Run, SpeedrunConfig, stage_record
from minilm.weights import read_json, write_json

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
    """--only re-runs a stage from scratch; its previous folder is kept as <stage>.prev, not deleted.

    Only a finished folder (one with stage.json) is set aside: an unfinished one is an --only run
    that was killed, so the same command again resumes it and the kept original stays."""
    if (stage_dir / "stage.json").exists():
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
    resumed = stage_dir.exists()  # an earlier, killed attempt left files
    cfg = configure(run, name)
    t0 = time.time()
    result, ckpt = STAGES[name].execute(run, cfg)
    record = stage_record(run, name, STAGES[name].title, time.time() - t0, result, ckpt, resumed)
    # written last and atomically: its existence is what marks the stage finished
    write_json(stage_dir / "stage.json", record)
    return record


def plan(cfg: SpeedrunConfig) -> list[tuple[str, object]]:
    """(stage, its config) for every stage this command would run: what --dry-run prints."""
    run = Run(cfg)
    return [(name, configure(run, name)) for name in (cfg.only_stages() or STAGES)]


def check_run(run: Run, write: bool = True) -> None:
    """Refuse a speedrun into a folder made with another preset, or with other --set values for a
    stage that has finished there (it would be skipped and its old numbers reported as the new run's);
    record the preset and --set values in OUT/speedrun.json."""
    path, cfg = run.root / "speedrun.json", run.cfg
    saved = (read_json(path, fix="it records the run's preset and --set values; pass another --out-dir")
             if path.exists() else {"preset": cfg.preset, "overrides": {}})
    if saved["preset"] != cfg.preset:
        raise MinilmError(f"{run.root} holds a --preset {saved['preset']} speedrun, not {cfg.preset}; pass "
                          f"--out-dir NEW (the default for --preset {cfg.preset} is runs/speedrun-{cfg.preset})")
    redo = set(cfg.only_stages())
    stale = [s for s in STAGES if saved["overrides"].get(s, {}) != cfg.overrides.get(s, {})
             and run.record(s) is not None and s not in redo]
    if stale:
        raise MinilmError(f"{run.root}: {', '.join(stale)} finished with other --set values "
                          f"({saved['overrides']}); re-run them with --only {','.join(stale)}, or pass --out-dir NEW")
    if write:
        write_json(path, {"preset": cfg.preset, "overrides": cfg.overrides})


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    """Every stage in order, skipping finished ones (or exactly the --only stages, from scratch)."""
    rank = int(os.environ.get("RANK", "0"))
    # one speedrun per folder (rank 0 holds it; each stage also locks its own subfolder)
    with writer_lock(cfg.out_dir) if rank == 0 else contextlib.nullcontext():
        return _run_stages(cfg)


def _run_stages(cfg: SpeedrunConfig) -> dict:
    run = Run(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    names = cfg.only_stages() or list(STAGES)
    check_run(run, write=rank == 0)
    if rank == 0 and cfg.only_stages():
        for name in names:
            _set_aside(run.dir(name))
    records, started, redo = {}, time.time(), bool(cfg.only_stages())  # redo: --only runs even finished stages
    for i, name in enumerate(names, 1):
        if not redo and run.record(name) is not None:
            records[name] = run.record(name)
            continue
        if rank != 0:  # torchrun: wait for the data, join pretraining, leave the rest to rank 0
            if name == "data":  # with --only, rank 0 may not have set the old record aside yet
                _wait_for(run.dir("data") / "stage.json", newer_than=started if redo else 0.0)
            elif name == "pretrain":
                STAGES[name].execute(run, configure(run, name))  # its DDP share; no record
            else:
                break
            continue
        tqdm.write(f"\n[{i}/{len(names)}] {name}: {STAGES[name].title}")
        # pretraining keeps torchrun's variables (DDP); every other stage runs on rank 0 as a single process
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
        fields = out.setdefault(stage, {})
        try:
            fields[name.replace("-", "_")] = json.loads(value)  # 100 -> int, true -> bool
        except json.JSONDecodeError:
            fields[name.replace("-", "_")] = value              # qa -> "qa"
    return out
