"""The pruning stage end to end on a tiny checkpoint: it ends at the requested sparsity, only the
kept neurons matter in the saved model, distillation runs, and an interrupted run resumes exactly."""

import json

import pytest
import torch
from conftest import tiny_config

from minilm.checkpoint import load_checkpoint, save_checkpoint
from minilm.config import build
from minilm.model import Phi3
from minilm.prune.redundancy import NeuronMasker
from minilm.prune.scores import neuron_slices
from minilm.stages.prune import PruneConfig, run_prune
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_11


@pytest.fixture(scope="module")
def base_ckpt(data_dir, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prune") / "base"
    save_checkpoint(path, Phi3(tiny_config()), Tokenizer.load(data_dir), meta={"stage": "pretrain"})
    return path


def prune_cfg(base, out, **kw) -> PruneConfig:
    fields = dict(init=str(base), out_dir=str(out), max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2,
                  prune_warmup=2, prune_final=4, mask_every=2, n_train=40, n_eval=6, max_len=48,
                  eval_every=6, ckpt_every=6, log_every=1, device="cpu", resume=True)
    return build(PruneConfig, **{**fields, **kw})


@pytest.mark.parametrize("method", ["magnitude", "random", "movement", "gum"])
def test_stage_ends_at_the_sparsity_with_only_kept_neurons_in_effect(base_ckpt, tmp_path, method):
    result = run_prune(prune_cfg(base_ckpt, tmp_path, method=method, sparsity=0.5))
    dens = result["densities"]
    if method == "gum":                             # global ranking: 0.5 of all neurons, any split
        assert result["ranking"] == "global" and round(sum(d * 96 for d in dens)) == 96
    else:
        assert result["ranking"] == "local" and dens == [0.5, 0.5]
    masked = load_checkpoint(result["masked_checkpoint"])
    masks = [masked.extra["prune"][f"mask_{i}"] for i in range(2)]
    assert [m.mean().item() for m in masks] == dens
    for layer, mask in zip(masked.model.model.layers, masks):
        for w in (neuron_slices(layer.mlp)[0], neuron_slices(layer.mlp)[1], neuron_slices(layer.mlp)[2].T):
            assert torch.all(w[mask == 0] == 0) and torch.all(w[mask == 1].abs().sum(1) > 0)
    # the trained dense weights (run_loop's checkpoint) under the masks == the saved masked model
    dense = load_checkpoint(tmp_path / "checkpoint").model
    masker = NeuronMasker(dense)
    masker.masks = masks
    x = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(dense(x)[0], masked.model(x)[0], rtol=0, atol=1e-5)
    assert result["redundancy_after"]["density"] == dens
    assert json.loads((tmp_path / "prune.json").read_text())["after"] == result["after"]
    after = result["after"]                         # zeroed weights == skipping kernel == compacted
    assert after["heldout_loss_kernel"] == pytest.approx(after["heldout_loss"], abs=1e-4)
    assert result["compact"]["heldout_loss"] == pytest.approx(after["heldout_loss"], abs=1e-4)
    compact = load_checkpoint(result["compact"]["path"]).model
    assert compact.config.d_ff_per_layer == tuple(int(m.sum()) for m in masks)
    torch.testing.assert_close(compact(x)[0], masked.model(x)[0], rtol=0, atol=1e-4)


def test_distillation_and_bad_flags(base_ckpt, tmp_path):
    result = run_prune(prune_cfg(base_ckpt, tmp_path, method="random", sparsity=0.75, distill=True))
    assert result["densities"] == [0.25, 0.25] and result["distill"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] >= 0 for r in rows) and rows[-1]["density"] == 0.25
    from minilm import MinilmError
    with pytest.raises(MinilmError, match="method"):
        run_prune(prune_cfg(base_ckpt, tmp_path / "x", method="l0"))
    with pytest.raises(MinilmError, match="sparsity"):
        run_prune(prune_cfg(base_ckpt, tmp_path / "y", sparsity=1.0))


def test_interrupted_gum_run_resumes_exactly(base_ckpt, tmp_path):
    whole = run_prune(prune_cfg(base_ckpt, tmp_path / "a", method="gum"))

    def crash(step, row):
        if step == 8:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_prune(prune_cfg(base_ckpt, tmp_path / "b", method="gum"), on_step=crash)
    resumed = run_prune(prune_cfg(base_ckpt, tmp_path / "b", method="gum"))
    assert resumed["densities"] == whole["densities"] and resumed["after"] == whole["after"]
    a = load_checkpoint(tmp_path / "a" / "masked").model.state_dict()
    b = load_checkpoint(tmp_path / "b" / "masked").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prune_runs_and_reports(base_ckpt, tmp_path, capsys):
    from minilm.cli import main
    argv = ["prune", "--init", str(base_ckpt), "--out-dir", str(tmp_path), "--method", "magnitude",
            "--sparsity", "0.5", "--max-steps", "12", "--prune-warmup", "2", "--prune-final", "4",
            "--batch-size", "4", "--n-train", "40", "--n-eval", "6", "--max-len", "48", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-layer density 0.50, 0.50" in out and "held-out loss" in out and "redundancy" in out
    assert main(["prune", "--init", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "m")]) == 2
    assert "is not a minilm checkpoint" in capsys.readouterr().err
