"""FSDP2 on CPU (gloo): 2 sharded ranks train like 1 process, and a killed sharded run resumes exactly.

    pytest -m lesson_03 tests/test_fsdp.py          # ~1 minute: short `minilm train` runs under torchrun

As in tests/test_ddp.py, rank r of W takes micro-batches r, r + W, ..., so 2 ranks with grad_accum 1
see what 1 process with grad_accum 2 sees. FSDP reduce-scatters (averages) the gradients instead of
all-reducing them, and AdamW updates each rank's shard, so the two runs agree to float32 rounding
over 20 steps. Clipping is off in that comparison (grad_clip 1000): the global norm sums the
shards' squares in another order, and at lr 1e-2 a clip factor that differs in its 7th digit
grows into visibly different runs within 20 steps (measured: losses apart by 1e-3 at step 18). A checkpoint is unsharded either way (minilm/fsdp.py), so the sharded run's final
checkpoint loads like any other, and a sharded run killed mid-way and started again ends with
exactly the weights of an uninterrupted sharded run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_ddp import MODEL, REPO

from minilm.checkpoint import load_checkpoint, read_config
from minilm.fsdp import by_index, by_name

pytestmark = [pytest.mark.lesson_03,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch has no gloo backend")]

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def command(launcher, data_dir, out_dir, grad_accum, steps, *extra):
    return [sys.executable, *launcher, "-m", "minilm", "train", "--data-dir", str(data_dir), "--out-dir", out_dir,
            "--grad-accum", str(grad_accum), *MODEL, "--batch-size", "4", "--max-steps", str(steps),
            "--eval-every", str(steps), "--log-every", "1", "--lr", "1e-2", "--warmup-steps", "2",
            "--no-samples", "--device", "cpu", *extra]


def clean_env() -> dict:
    """This environment without torchrun's variables, one thread per process, this checkout's minilm."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])   # "pid (name) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def kill_mid_run(cmd, cwd, ckpt, at_least: int, steps: int) -> int:
    """Start `cmd`, SIGKILL it (torchrun and every rank) once `ckpt` holds step >= at_least; the step."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpt / "config.json").exists() and read_config(ckpt)["meta"]["step"] >= at_least:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its step-{at_least} checkpoint"
    # torchrun starts each rank in a session of its own, so killing torchrun's process group alone
    # would leave them training on: kill the ranks first, wait until torchrun has reaped them (a
    # zombie still holds the run's lock), then torchrun
    ranks = children(proc.pid)
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = read_config(ckpt)["meta"]["step"]
    assert at_least <= step < steps, f"the run was not stopped mid-way (checkpoint at step {step})"
    return step


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_optimizer_state_by_name_and_back_by_hand():
    sd = {"state": {0: {"step": 1}, 1: {"step": 2}}, "param_groups": [{"lr": 1.0, "params": [1]}, {"params": [0]}]}
    named = by_name(sd, ["b.weight", "a.weight"])
    assert named == {"state": {"b.weight": {"step": 1}, "a.weight": {"step": 2}},
                     "param_groups": [{"lr": 1.0, "params": ["a.weight"]}, {"params": ["b.weight"]}]}
    assert by_index(named, ["b.weight", "a.weight"]) == sd


def test_two_sharded_ranks_equal_one_process_over_20_steps(data_dir, tmp_path):
    no_clip = ["--set", "grad_clip=1000"]
    run(command(TORCHRUN, data_dir, "fsdp", 1, 20, "--fsdp", "--activation-checkpointing", *no_clip), tmp_path)
    run(command([], data_dir, "single", 2, 20, *no_clip), tmp_path)
    fsdp, single = metrics(tmp_path / "fsdp" / "metrics.jsonl"), metrics(tmp_path / "single" / "metrics.jsonl")
    assert [m["step"] for m in fsdp] == [m["step"] for m in single] == list(range(1, 21))
    for a, b in zip(fsdp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert fsdp[-1]["loss"] < fsdp[0]["loss"] - 0.1                      # it learned
    assert fsdp[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    # the sharded run's checkpoint is an ordinary, unsharded one
    a = load_checkpoint(tmp_path / "fsdp" / "checkpoint", with_train_state=True)
    b = load_checkpoint(tmp_path / "single" / "checkpoint", with_train_state=True)
    torch.testing.assert_close(a.model.state_dict(), b.model.state_dict(), rtol=0, atol=2e-5)
    assert a.train_state["optimizer"]["param_groups"][0]["params"] == b.train_state["optimizer"]["param_groups"][0]["params"]
    for i, s in b.train_state["optimizer"]["state"].items():
        torch.testing.assert_close(a.train_state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], rtol=0, atol=1e-5)


def test_a_killed_sharded_run_resumes_bit_identically(data_dir, tmp_path):
    run(command(TORCHRUN, data_dir, "whole", 1, 12, "--fsdp"), tmp_path)
    cmd = command(TORCHRUN, data_dir, "killed", 1, 12, "--fsdp", "--set", "ckpt_every=2")
    kill_mid_run(cmd, tmp_path, tmp_path / "killed" / "checkpoint", at_least=4, steps=12)
    run(cmd, tmp_path)                           # the same command: resumes from the sharded run's checkpoint
    whole, killed = (load_checkpoint(tmp_path / d / "checkpoint", with_train_state=True) for d in ("whole", "killed"))
    torch.testing.assert_close(killed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(killed.train_state["optimizer"]["state"], whole.train_state["optimizer"]["state"],
                               rtol=0, atol=0)


def test_activation_checkpointing_recomputes_the_same_gradients():
    from conftest import tiny_config

    from minilm.model import Phi3
    torch.manual_seed(0)
    model = Phi3(tiny_config())
    idx = torch.randint(0, 320, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model.model.checkpointing = checkpointing
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
