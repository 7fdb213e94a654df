"""FSDP2 for SFT, DPO and DNO on CPU (gloo): 2 sharded ranks train like 1 process, and resume is exact.

    pytest tests/test_fsdp_post.py      # ~2.5 minutes on 2 cores: short `minilm sft|dpo|dno` runs under torchrun

The post-training loop cuts each step's batch into --micro-batches parts and averages them; under
torchrun with --fsdp rank r of W runs parts r, r + W, ... (minilm/loop.py). With 2 parts, 2 sharded
ranks and 1 process compute the same parts, so the runs agree. They came out bit-identical here:
each part's forward is the same on both sides, and the reduce-scatter's (g0 + g1) / 2 equals the
single process's g0 / 2 + g1 / 2 exactly (halving is exact, a sum of two is commutative). The
asserts allow float32 rounding (1e-6) for a torch that divides elsewhere. Clipping is off
(grad_clip 1000): the global norm sums the shards' squares in another order (the grad norms differ
by up to 6e-6, relative), and a clip factor that differs in its 6th digit grows over 20 steps
(1e-3 in the loss in tests/test_fsdp.py). DPO's and DNO's frozen reference is sharded like the
policy. Checkpoints are unsharded: a killed sharded run resumes bit-identically, by torchrun or by
one process.
"""

import json
import sys

import pytest
import torch
import torch.distributed as dist
from test_fsdp import TORCHRUN, kill_mid_run, run
from test_reward import base_checkpoint  # noqa: F401
from test_sft import fresh_model, lm_loss, post_config, random_batch

from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.fsdp import sharded_run
from minilm.loop import epoch_batches, make_optimizer, optimizer_step, run_loop, trained_params
from minilm.runtime import Runtime

pytestmark = [pytest.mark.lesson_03, pytest.mark.lesson_06]
gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="this torch has no gloo backend")

COMMON = ["--batch-size", "8", "--micro-batches", "2", "--set", "log_every=1", "--lr", "1e-2", "--device", "cpu",
          "--dtype", "fp32", "--set", "grad_clip=1000"]
SFT = ["--max-steps", "20", "--n-train", "200", "--n-eval", "4", "--max-len", "64", "--set", "max_new_tokens=8",
       "--eval-every", "20", "--ckpt-every", "20", "--warmup-steps", "2", "--set", "text_batch_size=4",
       "--set", "text_seq_len=32"]
DPO = ["--max-steps", "20", "--n-pairs", "200", "--n-eval-pairs", "40", "--n-judge", "4", "--max-len", "64",
       "--max-new-tokens", "8", "--eval-every", "20", "--ckpt-every", "20", "--warmup-steps", "2",
       "--sft-weight", "1", "--beta", "0.1"]
DNO = ["--iterations", "2", "--n-prompts", "8", "--samples", "2", "--batch-size", "4", "--set", "n_test=6", "--n-val", "4",
       "--max-new-tokens", "6", "--set", "max_len=64", "--sources", "arithmetic"]


def minilm(launcher, stage, init, out_dir, *extra):
    return [sys.executable, *launcher, "-m", "minilm", stage, "--init", str(init), "--out-dir", out_dir,
            *COMMON, *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_training(sharded_dir, single_dir):
    """Per-step losses and metrics (rel 1e-6), final weights and AdamW moments (1e-6) agree."""
    a, b = rows(sharded_dir / "metrics.jsonl"), rows(single_dir / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] and len(a) >= 2
    for x, y in zip(a, b):
        assert x["batch_tokens"] == y["batch_tokens"]    # the ranks' micro-batches add up to the batch
        for key in set(x) - {"steps_per_s", "grad_norm", "eval", "batch_tokens"}:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), key
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    ck = [load_checkpoint(d / "checkpoint", with_train_state=True) for d in (sharded_dir, single_dir)]
    torch.testing.assert_close(ck[0].model.state_dict(), ck[1].model.state_dict(), rtol=0, atol=1e-6)
    optim = [c.train_state["optimizer"] for c in ck]
    assert optim[0]["param_groups"] == optim[1]["param_groups"]     # the unsharded optimizer's layout
    torch.testing.assert_close(optim[0]["state"], optim[1]["state"], rtol=0, atol=1e-6)
    return a


def assert_bit_identical(dir_a, dir_b):
    a, b = (load_checkpoint(d / "checkpoint", with_train_state=True) for d in (dir_a, dir_b))
    torch.testing.assert_close(a.model.state_dict(), b.model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(a.train_state["optimizer"]["state"], b.train_state["optimizer"]["state"],
                               rtol=0, atol=0)


# ---- in one process: the micro-batches, --fsdp without torchrun, the refusals ----------------------

def test_the_micro_batches_of_a_step_are_its_batch_cut_in_interleaved_parts():
    picks = epoch_batches(10, 6, seed=3)
    for step in range(4):
        parts = [picks(step, part, 3) for part in range(3)]
        assert all(len(p) == 2 for p in parts) and sorted(i for p in parts for i in p) == sorted(picks(step))
        assert parts[1] == picks(step)[1::3]


def test_micro_batches_average_the_gradients_of_the_parts(tmp_path):
    """One step with micro_batches 2 moves the weights as AdamW on (grad part 0 + grad part 1) / 2."""
    def batch_fn(step, part=0, parts=1):
        full = random_batch(step)
        return {k: v[part::parts] for k, v in full.items()}
    model = fresh_model()
    cfg = post_config(tmp_path, max_steps=1, warmup_steps=1, micro_batches=2, dtype="fp32")
    run_loop(cfg, model, batch_fn, lm_loss, None)
    by_hand = fresh_model()
    optimizer = make_optimizer(by_hand, cfg.optim)
    for part in range(2):
        (lm_loss(by_hand, batch_fn(0, part, 2))[0] / 2).backward()
    optimizer_step(optimizer, trained_params(optimizer), cfg.optim.grad_clip)   # the norm in the loop's order
    torch.testing.assert_close(model.state_dict(), by_hand.state_dict(), rtol=0, atol=0)


def test_fsdp_on_one_process_trains_exactly_as_without_it(tmp_path):
    models = [fresh_model(), fresh_model()]
    for fsdp, model in zip((False, True), models):
        run_loop(post_config(tmp_path / str(fsdp), max_steps=3, fsdp=fsdp), model, random_batch, lm_loss, None)
    torch.testing.assert_close(models[0].state_dict(), models[1].state_dict(), rtol=0, atol=0)


def test_what_the_loop_cannot_run_is_refused_with_a_way_on():
    two = Runtime(torch.device("cpu"), None, rank=0, world_size=2)
    cfg = post_config("unused")
    with pytest.raises(MinilmError, match="only with --fsdp"):
        sharded_run(cfg, two)
    from minilm.stages.sft import sft_config
    with pytest.raises(MinilmError, match="LoRA"):
        sharded_run(sft_config("tiny", fsdp=True, lora_r=4), two)
    with pytest.raises(MinilmError, match="batch_size 32 must cut into micro_batches 3"):
        sharded_run(sft_config("tiny", fsdp=True, micro_batches=3), Runtime(torch.device("cpu"), None))
    with pytest.raises(MinilmError, match="a multiple of the 2 process"):
        sharded_run(sft_config("tiny", fsdp=True, micro_batches=1), two)
    assert sharded_run(sft_config("tiny", fsdp=True), two) and not sharded_run(sft_config("tiny", fsdp=True),
                                                                                Runtime(torch.device("cpu"), None))


# ---- under torchrun: SFT ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_runs(base_checkpoint, data_dir, tmp_path_factory):  # noqa: F811
    """The same SFT run (20 steps, 2 micro-batches, clean-text replay) sharded on 2 ranks and on 1 process."""
    cwd = tmp_path_factory.mktemp("sft")
    text = ["--text-data", str(data_dir)]
    run(minilm(TORCHRUN, "sft", base_checkpoint, "fsdp", *SFT, *text, "--fsdp", "--activation-checkpointing"), cwd)
    run(minilm([], "sft", base_checkpoint, "single", *SFT, *text), cwd)
    return cwd, text


@gloo
def test_sft_two_sharded_ranks_equal_one_process_over_20_steps(sft_runs):
    cwd, _ = sft_runs
    steps = assert_same_training(cwd / "fsdp", cwd / "single")
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert steps[-1]["chat_loss"] < steps[0]["chat_loss"] - 1 and "text_loss" in steps[-1]   # it learned; replay on
    evals = [json.loads((cwd / d / "eval.json").read_text()) for d in ("fsdp", "single")]
    # the held-out judgement after training ran on the sharded model, on both ranks in lockstep
    assert evals[0]["after"] == pytest.approx(evals[1]["after"], rel=1e-6)
    assert sorted(p.name for p in (cwd / "fsdp").iterdir()) == sorted(p.name for p in (cwd / "single").iterdir())


@gloo
def test_a_killed_sharded_sft_run_resumes_bit_identically(sft_runs, base_checkpoint):  # noqa: F811
    cwd, text = sft_runs
    cmd = minilm(TORCHRUN, "sft", base_checkpoint, "killed", *SFT, *text, "--fsdp", "--set", "ckpt_every=2")
    kill_mid_run(cmd, cwd, cwd / "killed" / "checkpoint", at_least=4, steps=20)
    run(cmd, cwd)                                 # the same command resumes from the sharded run's checkpoint
    assert_bit_identical(cwd / "killed", cwd / "fsdp")


# ---- under torchrun: DPO and DNO, both with a sharded frozen reference -------------------------------

@pytest.fixture(scope="module")
def dpo_runs(base_checkpoint, tmp_path_factory):  # noqa: F811
    cwd = tmp_path_factory.mktemp("dpo")
    run(minilm(TORCHRUN, "dpo", base_checkpoint, "fsdp", *DPO, "--fsdp"), cwd)
    run(minilm([], "dpo", base_checkpoint, "single", *DPO), cwd)
    return cwd


@gloo
def test_dpo_two_sharded_ranks_equal_one_process_over_20_steps(dpo_runs):
    steps = assert_same_training(dpo_runs / "fsdp", dpo_runs / "single")
    assert steps[-1]["loss"] < steps[0]["loss"] - 1
    evals = [json.loads((dpo_runs / d / "eval.json").read_text()) for d in ("fsdp", "single")]
    assert evals[0]["eval_margin"] == pytest.approx(evals[1]["eval_margin"], rel=1e-5)
    assert evals[0]["dpo"] == pytest.approx(evals[1]["dpo"], rel=1e-6)


@gloo
def test_a_killed_sharded_dpo_run_resumes_on_one_process_bit_identically(dpo_runs, base_checkpoint):  # noqa: F811
    """The checkpoint does not care how it was trained: one process takes over from two ranks."""
    cmd = minilm(TORCHRUN, "dpo", base_checkpoint, "killed", *DPO, "--set", "ckpt_every=2", "--fsdp")
    kill_mid_run(cmd, dpo_runs, dpo_runs / "killed" / "checkpoint", at_least=4, steps=20)
    out = run(minilm([], "dpo", base_checkpoint, "killed", *DPO, "--set", "ckpt_every=2"), dpo_runs).stdout
    assert "resuming from killed/checkpoint" in out
    assert_bit_identical(dpo_runs / "killed", dpo_runs / "fsdp")


@gloo
def test_dno_two_sharded_ranks_equal_one_process_over_two_iterations(base_checkpoint, tmp_path):  # noqa: F811
    """Every rank samples and judges alike (rank 0 writes); iteration 2 starts from iteration 1's
    checkpoint, which rank 0 gathered and wrote, with pi_1 as its sharded reference."""
    run(minilm(TORCHRUN, "dno", base_checkpoint, "fsdp", *DNO, "--fsdp"), tmp_path)
    run(minilm([], "dno", base_checkpoint, "single", *DNO), tmp_path)
    for t in (1, 2):
        assert_same_training(tmp_path / "fsdp" / f"iter_{t}", tmp_path / "single" / f"iter_{t}")
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("fsdp", "single"))
    assert a["table"] == b["table"] and a["best_iteration"] == b["best_iteration"]
