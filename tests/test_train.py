"""The pretraining loop (minilm/stages/pretrain.py, minilm/loop.py): schedule, optimizer groups,
a run that learns, exact resume.

    pytest -m lesson_03 tests/test_train.py

Every run here is a 23k-parameter model on the `data_dir` fixture and takes well under a second.
`train()` writes into its config (it fills in `cfg.seq_len`), so each run gets a fresh TrainConfig
from `run_config` rather than reusing one.
"""

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_config

from minilm import MinilmError
from minilm.checkpoint import load_checkpoint
from minilm.config import build
from minilm.loop import lr_at, make_optimizer, optimizer_step
from minilm.model import Phi3
from minilm.stages.pretrain import TrainConfig, train

pytestmark = pytest.mark.lesson_03

N_STEPS = 8  # length of the resume runs; they are checkpointed and interrupted at N_STEPS // 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads stall when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_config(out_dir, data_dir, **overrides) -> TrainConfig:
    fields = dict(preset="tiny", model=tiny_config(n_layer=1, d_model=32, n_head=2, n_kv_head=1).to_dict(),
                  out_dir=str(out_dir), data_dir=str(data_dir), batch_size=8, seq_len=32,
                  max_steps=N_STEPS, lr=1e-2, warmup_steps=2, eval_every=N_STEPS, eval_batches=2,
                  ckpt_every=N_STEPS // 2, log_every=1, device="cpu")
    return build(TrainConfig, **{**fields, **overrides})


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / "checkpoint").model.state_dict()


# ---- pure pieces ---------------------------------------------------------------------------------

def test_lr_schedule_at_hand_computed_points():
    cfg = build(TrainConfig, lr=2.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * 1 / 10)      # warmup starts at lr / warmup_steps
    assert lr_at(4, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * 5 / 10)
    assert lr_at(9, cfg.optim, cfg.max_steps) == pytest.approx(2.0)               # last warmup step reaches lr
    assert lr_at(10, cfg.optim, cfg.max_steps) == pytest.approx(2.0)              # cosine starts at its top
    # halfway through the cosine, cos(pi/2) = 0: the midpoint of lr and lr * min_lr_ratio
    assert lr_at(60, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    # a quarter of the way: 0.5 * (1 + cos(pi/4))
    assert lr_at(35, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))))
    assert lr_at(110, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * 0.1)       # the end: lr * min_lr_ratio
    assert lr_at(500, cfg.optim, cfg.max_steps) == pytest.approx(2.0 * 0.1)       # and it stays there
    assert lr_at(0, build(TrainConfig, lr=2.0, warmup_steps=0, max_steps=10).optim, 10) == pytest.approx(2.0)


@pytest.mark.parametrize("tie", [True, False])
def test_optimizer_decays_matrices_only(tie):
    model = Phi3(tiny_config(tie_embeddings=tie))
    decay, no_decay = make_optimizer(model, build(TrainConfig, weight_decay=0.1).optim).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    group_of = {id(p): "decay" for p in decay["params"]} | {id(p): "no_decay" for p in no_decay["params"]}
    names = dict(model.named_parameters())  # a tied weight is listed once
    assert len(group_of) == len(names) == len(decay["params"]) + len(no_decay["params"])
    for name, p in names.items():
        matrix = name.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight",
                                "down_proj.weight", "lm_head.weight"))
        assert matrix or name.endswith(("layernorm.weight", "norm.weight", "embed_tokens.weight")), name
        assert group_of[id(p)] == ("decay" if matrix else "no_decay"), name
    assert ("lm_head.weight" in names) == (not tie)


# ---- training runs -------------------------------------------------------------------------------

def test_short_run_learns_and_changes_every_parameter(data_dir, tmp_path, monkeypatch):
    initial = {}

    class RecordedPhi3(Phi3):  # train() builds its model through this: keep the weights it starts from
        def __init__(self, cfg):
            super().__init__(cfg)
            initial.update({k: v.clone() for k, v in self.named_parameters()})

    monkeypatch.setattr("minilm.stages.pretrain.Phi3", RecordedPhi3)
    out = tmp_path / "run"
    summary = train(run_config(out, data_dir, max_steps=20, eval_every=20, ckpt_every=20))
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(320), abs=0.1)  # about uniform over the vocab at init
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert summary["val_loss"] < losses[0] - 0.5
    trained = dict(load_checkpoint(out / "checkpoint").model.named_parameters())
    assert initial.keys() == trained.keys()
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"parameters not updated by training: {unchanged}"


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference: N_STEPS steps in one go (checkpointing at N_STEPS // 2 as the others do)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, train(run_config(out, data_dir))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [N_STEPS // 2, N_STEPS // 2 + 2])
def test_resume_is_exact(data_dir, tmp_path, uninterrupted, stop_at):
    """Killed right after the checkpoint at N/2 (or two steps later, so those steps are redone),
    then resumed by a fresh train(): the same losses and bit-identical weights as one long run.

    Bit-exact, not merely close: the batches are a pure function of (seed, step, micro), the
    weights and AdamW moments are saved as exact float32 bits, the RNG state is restored, and the
    CPU kernels are deterministic for a fixed shape and thread count. A tolerance could hide a
    missed piece of state: AdamW's step count off by one already moves the next loss by ~1e-2.
    """
    ref_out, ref_summary = uninterrupted
    out = tmp_path / "run"

    def stop(step, row):
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(run_config(out, data_dir), on_step=stop)
    assert load_checkpoint(out / "checkpoint", with_train_state=True).train_state["step"] == N_STEPS // 2
    summary = train(run_config(out, data_dir))

    ref_metrics, metrics = read_metrics(ref_out), read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, N_STEPS + 1))  # no step twice after resume
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    assert summary["val_loss"] == ref_summary["val_loss"]
    ref_weights, weights = final_weights(ref_out), final_weights(out)
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name


def test_resume_refuses_a_different_model(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    cfg = run_config(out, data_dir)
    cfg.model["n_layer"] = 2
    with pytest.raises(MinilmError, match="other settings: model .*'n_layer': 1.* -> .*'n_layer': 2"):
        train(cfg)
    assert load_checkpoint(out / "checkpoint").config.n_layer == 1  # the old checkpoint is untouched
    (out / "settings.json").unlink()       # a run from before settings.json: the checkpoint still says
    with pytest.raises(MinilmError, match="different model"):
        train(cfg)

    # the advice in the message: --no-resume starts over, and the old run's metrics are dropped
    cfg = run_config(out, data_dir, resume=False)
    cfg.model["n_layer"] = 2
    train(cfg)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, N_STEPS + 1))
    assert load_checkpoint(out / "checkpoint").config.n_layer == 2


def test_loss_plot_is_written(uninterrupted):
    pytest.importorskip("matplotlib")
    png = uninterrupted[0] / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimizer_step_refuses_non_finite_gradients_and_weights():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(MinilmError, match="gradient norm became nan at step 7"):
        optimizer_step(torch.optim.SGD([p], lr=1.0), [p], 1.0, "step 7")
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None     # not stepped
    p.grad = torch.full((3,), 1e10)                              # finite, but lr * grad = 1e48 overflows
    with pytest.raises(MinilmError, match="weights became non-finite at step 8"):
        optimizer_step(torch.optim.SGD([p], lr=1e38), [p], 1e30, "step 8")


def test_a_diverging_run_stops_before_a_non_finite_checkpoint(data_dir, tmp_path):
    """lr 1e6 blows the weights up within a few steps: the run stops with one message naming the
    step, and the checkpoint on disk holds finite weights (a rerun could resume from it)."""
    cfg = run_config(tmp_path, data_dir, lr=1e6, warmup_steps=0, ckpt_every=1, max_steps=20)
    with pytest.raises(MinilmError, match=r"(gradient norm became|weights became non-finite) .*at step \d+"):
        train(cfg)
    if (tmp_path / "checkpoint").exists():
        ck = load_checkpoint(tmp_path / "checkpoint")
        assert all(torch.isfinite(p).all() for p in ck.model.parameters())
