"""A stage's output folder remembers the settings its run started with, and refuses others.

    check_settings(cfg, "sft")      # first thing in every run_<stage>; MinilmError on a mismatch

Every stage writes into cfg.out_dir and, when cfg.resume is on, continues the run it finds there.
Continuing is only right with the same settings: a rerun with another --lr would train on from
the old run's checkpoint and print the old numbers as its own. So the first run records its full
config (flat names, as flags spell them) in OUT/settings.json, and a rerun that finds progress
there compares: any field that differs stops it, before anything is loaded, with one message
naming the fields and the two ways on (a new --out-dir, or --no-resume to train over it from
scratch). What may differ is where and how the run executes (device, dtype, FSDP sharding,
activation checkpointing: none changes the math) and how much it logs (MAY_CHANGE), and
max_steps may grow: training longer is continuing. A folder holding another stage's checkpoint,
or the checkpoint the stage starts from (--init), is refused as well.

One writer per folder: `writer_lock(out_dir)` (and the `one_writer` decorator on every run_<stage>,
on rank 0 under torchrun) holds OUT/.lock with the writer's pid and host, so a second run into the same folder stops with
one message instead of deleting the first one's temporary checkpoint. A run refused (MinilmError)
before its first save puts settings.json back, and removes the folder if it made it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from pathlib import Path

from minilm import MinilmError
from minilm.checkpoint import has_train_state, read_config
from minilm.config import flatten
from minilm.weights import process_alive, read_json, write_json

_before: dict[Path, tuple] = {}   # out_dir -> (settings.json's bytes or None, progress stamp) before this run
MAY_CHANGE = ("out_dir", "device", "dtype", "resume", "log_every", "fsdp", "activation_checkpointing")
SETTINGS = "settings.json"


def _has_progress(out: Path) -> bool:
    """Whether `out` holds a run to continue: any checkpoint with a train state under it."""
    return out.is_dir() and any(out.rglob("train_state.pt"))


def _stage_of(out: Path) -> str | None:
    """The stage that wrote out/checkpoint, from its metadata (runs from before settings.json)."""
    if not (out / "checkpoint" / "config.json").exists():
        return None
    return read_config(out / "checkpoint").get("meta", {}).get("stage")


def differences(saved: dict, now: dict) -> list[str]:
    """The fields of `now` that a continuation of the run recorded as `saved` may not have."""
    now = json.loads(json.dumps(now, default=str))        # tuples -> lists, as the file has them
    fields = sorted((set(saved) | set(now)) - set(MAY_CHANGE) - {"max_steps"})
    changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in fields if saved.get(k) != now.get(k)]
    if now.get("max_steps", 0) < saved.get("max_steps", 0):  # a shorter run would report the old one's end
        changed.append(f"max_steps {saved['max_steps']} -> {now['max_steps']} (it may only grow)")
    return changed


def check_settings(cfg, stage: str, write: bool = True) -> None:
    """Refuse to continue the run in cfg.out_dir with other settings than it started with; record
    cfg's settings there (unless `write` is False: torchrun ranks other than 0 only check)."""
    out, now = Path(cfg.out_dir), flatten(cfg)
    init = getattr(cfg, "init", "")
    if init and Path(init).resolve() in (out.resolve(), (out / "checkpoint").resolve()):
        raise MinilmError(f"--out-dir {out} is where --init {init} lives: the {stage} run would overwrite the "
                          f"checkpoint it starts from; pass another --out-dir")
    ckpt = out / "checkpoint"
    if cfg.resume and (ckpt / "config.json").exists() and not has_train_state(ckpt):
        # a final, exported or imported checkpoint: nothing to continue, and training would overwrite it
        raise MinilmError(f"{ckpt} is a checkpoint without train_state.pt, so it cannot be continued and a "
                          f"new run would overwrite it; pass --out-dir NEW, or --no-resume to train over it")
    if cfg.resume and _has_progress(out):
        path = out / SETTINGS
        saved = (read_json(path, fix=f"it records the settings of the run in {out}; pass --out-dir NEW for a new "
                                     f"run, or --no-resume to train over it from scratch")
                 if path.exists() else {"stage": _stage_of(out), "config": None})
        if saved["stage"] not in (None, stage):
            raise MinilmError(f"{out} holds a {saved['stage']} run, not a {stage} run; pass another --out-dir")
        changed = differences(saved["config"], now) if saved["config"] is not None else []
        if changed:
            raise MinilmError(f"{out} holds a {stage} run started with other settings: {'; '.join(changed)}. "
                              f"Rerun with its settings to continue it, pass --out-dir NEW for a new run, "
                              f"or --no-resume to train over it from scratch")
    if write:
        path = out / SETTINGS
        _before[out.resolve()] = (path.read_bytes() if path.exists() else None, _progress_stamp(out.resolve()))
        write_json(path, {"stage": stage, "config": now})


def _progress_stamp(out: Path) -> list:
    """Which train states `out` holds, and when each was written: changes with every save."""
    return sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("train_state.pt")) if out.is_dir() else []


def _undo_settings(out: Path) -> None:
    """A run refused after check_settings but before its first save puts settings.json back as it was."""
    if out not in _before:
        return
    text, stamp = _before.pop(out)
    if _progress_stamp(out) != stamp:
        return                              # it saved: the new settings describe the folder now
    if text is None:
        (out / SETTINGS).unlink(missing_ok=True)
    else:
        (out / SETTINGS).write_bytes(text)


# ---- one writer per folder --------------------------------------------------------------------------

LOCK = ".lock"
_held: dict[Path, int] = {}   # folders this process holds -> nesting depth


@contextlib.contextmanager
def writer_lock(out_dir):
    """Hold OUT/.lock (pid and host) while a run writes OUT; a second writer is refused.

    A lock whose process is gone (killed, crashed) is taken over; one from another host cannot be
    checked, so it is refused with its path to delete. Nested use in one process is fine."""
    out = Path(out_dir).resolve()
    if out in _held:
        _held[out] += 1
        try:
            yield
        finally:
            _held[out] -= 1
        return
    created = not out.exists()   # a run refused before it wrote anything leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads((out / LOCK).read_text())
            except (OSError, ValueError):   # half-written by a writer that died at once
                owner = {"pid": -1, "host": me["host"]}
            if owner.get("host") == me["host"] and not process_alive(owner.get("pid", -1)):
                (out / LOCK).unlink(missing_ok=True)     # its writer is dead: take over
                continue
            where = "" if owner.get("host") == me["host"] else f" on {owner.get('host')} (delete {out / LOCK} if it has stopped)"
            raise MinilmError(f"{out_dir} is being written by another run (pid {owner.get('pid')}{where}, "
                              f"since {owner.get('since')}); wait for it to finish or pass another --out-dir")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _held[out] = 1
    try:
        yield
    except MinilmError:
        _undo_settings(out)   # refused (bad data, a corrupt train state): the folder stays as it was
        raise
    finally:
        _before.pop(out, None)
        del _held[out]
        (out / LOCK).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def one_writer(run):
    """Decorate a `run_<stage>(cfg, ...)`: it holds cfg.out_dir's lock while it runs."""
    @functools.wraps(run)
    def locked(cfg, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:   # torchrun's other ranks: rank 0 alone writes out_dir
            return run(cfg, *args, **kwargs)
        with writer_lock(cfg.out_dir):
            return run(cfg, *args, **kwargs)
    return locked
