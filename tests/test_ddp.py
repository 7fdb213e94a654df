"""DDP on CPU: 2 processes with grad_accum A must train exactly like 1 process with grad_accum 2A.

    pytest -m lesson_03 tests/test_ddp.py          # ~30 s: four short `minilm train` runs

Rank r of W takes micro-batch indices r, r + W, ... (minilm/data.py), so the two ranks together
see the micro-batches 0 .. 2A-1 of every step that the single process sees. This is the strongest
check that sampling, gradient averaging and no_sync are wired right.

For A = 1 the final weights are bit-identical: the single process sums g0/2 + g1/2, DDP divides
each rank's gradient by 2 and all-reduces g0/2 + g1/2. Halving is exact in floating point and a
sum of two numbers does not depend on their order. For A = 2 the four gradients are summed in a
different order ((g0 + g2) + (g1 + g3) against ((g0 + g1) + g2) + g3), so the weights agree to
float32 rounding, ~1e-6, a thousand times below one AdamW update (~lr = 1e-2).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minilm.checkpoint import load_checkpoint

pytestmark = [pytest.mark.lesson_03,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch has no gloo backend")]

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--vocab-size", "320", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1",
         "--d-ff", "64", "--max-seq-len", "32"]
TRAIN = ["--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--log-every", "1",
         "--lr", "1e-2", "--warmup-steps", "1", "--no-samples", "--device", "cpu"]


def minilm_train(launcher: list[str], cwd: Path, out_dir: str, data_dir, grad_accum: int):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # import this checkout's minilm
    cmd = [sys.executable, *launcher, "-m", "minilm", "train", "--data-dir", str(data_dir),
           "--out-dir", out_dir, "--grad-accum", str(grad_accum), *MODEL, *TRAIN]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_equal_one_process_with_double_accumulation(data_dir, tmp_path, grad_accum):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp_stdout = minilm_train(torchrun, tmp_path, "ddp", data_dir, grad_accum)
    minilm_train([], tmp_path, "single", data_dir, 2 * grad_accum)

    # only rank 0 writes: nothing but the two run directories, each holding one run's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    for run in ("ddp", "single"):
        assert {p.name for p in (tmp_path / run).iterdir()} - {"loss.png"} == {"checkpoint", "metrics.jsonl",
                                                                             "settings.json"}
    assert ddp_stdout.count("validation loss") == 1, ddp_stdout  # rank 1 prints no summary

    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp] == [m["step"] for m in single] == [1, 2, 3, 4]
    for a, b in zip(ddp, single):
        # the logged loss is all-reduced in float32 under DDP, summed in float64 otherwise
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert ddp[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-6)
    assert ddp[-1]["val_loss"] < math.log(320) - 0.1  # it learned
    assert ddp[-1]["loss"] < ddp[0]["loss"] - 0.1

    ck_ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint", with_train_state=True)
    ck_single = load_checkpoint(tmp_path / "single" / "checkpoint", with_train_state=True)
    assert ck_ddp.train_state["step"] == ck_single.train_state["step"] == 4
    tol = 0.0 if grad_accum == 1 else 1e-5
    torch.testing.assert_close(ck_ddp.model.state_dict(), ck_single.model.state_dict(), rtol=0, atol=tol)
