"""Files that are written whole or not at all: weight files, directories, JSON and text.

    write_weights(state_dict, directory)          # model.safetensors (model.pt without safetensors)
    sd = read_weights(directory)                  # one clear MinilmError for a missing/corrupt file
    atomic_dir(directory, write)                  # write(tmp_dir), then swap tmp_dir into place
    write_json(path, obj); write_text(path, text) # temp file + os.replace

Every file minilm writes goes through this module, so a crash (or Ctrl-C, or SIGKILL) at any
instant leaves either the previous complete file or the new one, never half of one: `os.replace`
of a file and `rename` of a directory are atomic on POSIX file systems. A directory swap takes two
renames; `recover` finishes one that was killed between them. checkpoint.py and lora.py both
build on these helpers, so neither has to import the other's internals.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from minilm import MinilmError

try:
    import safetensors.torch as _st
except ImportError:  # optional: torch.save is the fallback
    _st = None
HAVE_SAFETENSORS = _st is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_weights(sd: dict, directory: Path, stem: str = "model") -> None:
    """`sd` as STEM.safetensors (STEM.pt when safetensors is not installed) inside `directory`."""
    if _st is not None:
        path = directory / f"{stem}.safetensors"
        _st.save_file(sd, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())   # safetensors writes 0600; others on the machine may read it
    else:
        torch.save(sd, directory / f"{stem}.pt")


def read_weights(directory: Path, names=("model.safetensors", "model.pt")) -> dict:
    """The first of `names` that exists in `directory`, as a {name: tensor} dict on the CPU."""
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_safetensors(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except MinilmError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise MinilmError(f"cannot read weights {path}: {e}. The file is corrupt; "
                              f"use an earlier checkpoint or retrain") from e
    raise MinilmError(f"no weights in {directory}: expected one of {', '.join(names)}")


def load_safetensors(path) -> dict:
    """One .safetensors file as a {name: tensor} dict (a clear error when the package is missing)."""
    if _st is None:
        raise MinilmError(f"{path} needs the safetensors package: pip install safetensors")
    return _st.load_file(str(path))


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a save's temp folders carry their writer's pid)."""
    if pid <= 0:   # unknown; and os.kill(-1, 0) would ask about every process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def _pid(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def recover(directory: Path) -> None:
    """Finish what a swap killed between its two renames left: put the previous directory back.

    A writer that is alive is merely between its renames: wait for it (up to 2 s) instead of
    putting the old directory back under it, which would make its second rename fail."""
    for _ in range(100):
        if directory.exists():
            return
        olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if not olds:
            return
        if _pid(olds[-1]) == os.getpid() or not process_alive(_pid(olds[-1])):
            break
        time.sleep(0.02)
    else:
        return
    if not directory.exists() and olds[-1].exists():
        olds[-1].rename(directory)


def atomic_dir(directory: Path, write) -> Path:
    """Call write(tmp_dir), then swap tmp_dir into place of `directory`.

    At every instant `directory` is the old complete directory or the new one, except between the
    two renames below, when the old one is `.NAME.old-PID`; `recover` puts it back.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        if not process_alive(_pid(stale)):   # left by a save that crashed mid-write; a live writer's is its own
            shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (a temp file beside it, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path, obj, indent: int | None = 2) -> Path:
    """`obj` as JSON at `path`, atomically; values JSON does not know (paths, ...) become strings."""
    return write_text(path, json.dumps(obj, indent=indent, default=str))


def read_json(path, expect: type = dict, fix: str = "delete it, or use another folder"):
    """The JSON object (or `expect`) at `path`; a missing, unreadable or malformed file is one MinilmError
    that names it and says what to do (`fix`), never a traceback."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise MinilmError(f"{path} is missing; {fix}") from None
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: json.JSONDecodeError
        raise MinilmError(f"{path} is corrupt ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(value, expect):
        raise MinilmError(f"{path} is corrupt (a JSON {type(value).__name__}, expected a {expect.__name__}); {fix}")
    return value
