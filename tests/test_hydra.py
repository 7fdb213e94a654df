"""Hydra-SFT: one model, LM loss on SFT chats + Bradley-Terry on pairs; vs a separate RM (lesson 08)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_reward import base_checkpoint, planted_pairs  # noqa: F401

from minilm.model import Phi3
from minilm.post.chat import collate
from minilm.post.heads import HydraModel
from minilm.post.preferences import pair_batch
from minilm.post.reward import bradley_terry_loss, hydra_sft_loss, load_reward_model
from minilm.stages.hydra_sft import hydra_sft_config

pytestmark = pytest.mark.lesson_08


CHATS = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([10, 11, 12], [0, 1, 1])]


@pytest.mark.parametrize("w_lm,w_rm", [(1.0, 1.0), (1.0, 0.1), (0.1, 1.0), (0.3, 2.0)])
def test_hydra_sft_loss_is_w_lm_times_lm_plus_w_rm_times_bt_by_hand(w_lm, w_rm):
    """Every weight 0: uniform logits give LM = ln 320 (the vocabulary), equal scores give BT = ln 2,
    so the loss is w_lm ln 320 + w_rm ln 2 exactly; a swapped or dropped weight shows."""
    hydra = HydraModel(Phi3(tiny_config()))
    for p in hydra.parameters():
        torch.nn.init.zeros_(p)
    batch = {"sft": collate(CHATS, pad_id=0, max_len=16), "pairs": pair_batch(planted_pairs(4, 0), 0, 64)}
    loss, m = hydra_sft_loss(hydra, batch, lm_weight=w_lm, rm_weight=w_rm)
    assert m["lm_loss"] == pytest.approx(math.log(320)) and m["bt_loss"] == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(w_lm * math.log(320) + w_rm * math.log(2))
    assert hydra_sft_config("tiny").rm_weight == 1.0 and hydra_sft_config("tiny", rm_weight=0.1).rm_weight == 0.1


def test_hydra_sft_loss_is_weighted_lm_plus_weighted_bt():
    torch.manual_seed(0)
    hydra = HydraModel(Phi3(tiny_config()))
    torch.nn.init.normal_(hydra.heads["reward"].weight, std=0.5)
    batch = {"sft": collate(CHATS, pad_id=0, max_len=16), "pairs": pair_batch(planted_pairs(4, 0), 0, 64)}
    loss, m = hydra_sft_loss(hydra, batch, lm_weight=0.5, rm_weight=0.1)
    sft = batch["sft"]
    lm = hydra(sft["tokens"], sft["attention_mask"], sft["targets"])[1]
    scores = hydra.score(batch["pairs"]["tokens"], batch["pairs"]["attention_mask"])
    bt, acc = bradley_terry_loss(scores[:4], scores[4:])
    torch.testing.assert_close(loss, 0.5 * lm + 0.1 * bt)
    assert m["lm_loss"] == pytest.approx(lm.item()) and m["accuracy"] == acc.item()
    loss.backward()
    assert hydra.heads["reward"].weight.grad.abs().sum() > 0 and hydra.lm.lm_head.weight.grad.abs().sum() > 0


def test_compare_reward_models_end_to_end(base_checkpoint, tmp_path):  # noqa: F811
    cfg = hydra_sft_config("tiny", init=str(base_checkpoint), out_dir=str(tmp_path / "hydra"), max_steps=3,
                           batch_size=4, sft_batch_size=4, n_pairs=60, n_eval_pairs=40, n_train=40, n_eval=4,
                           max_len=64, max_new_tokens=6, eval_every=3, ckpt_every=3, log_every=1,
                           warmup_steps=1, device="cpu")
    table = _bench("hydra_vs_reward").compare_reward_models(cfg)
    for side in ("hydra_sft", "separate_rm"):
        assert 0.0 <= table[side]["eval_accuracy"] <= 1.0
    assert 0.0 <= table["hydra_chat"]["reward"] <= 1.0
    hydra, _ = load_reward_model(tmp_path / "hydra" / "checkpoint")
    fresh = HydraModel(Phi3(tiny_config()))
    assert not torch.equal(hydra.heads["reward"].weight, fresh.heads["reward"].weight)
    assert (tmp_path / "hydra" / "separate-rm" / "checkpoint").exists()
    assert (tmp_path / "hydra" / "comparison.json").exists()


def test_compare_loss_weights_trains_one_hydra_sft_model_per_weight_pair(base_checkpoint, tmp_path):  # noqa: F811
    from minilm.checkpoint import load_checkpoint
    cfg = hydra_sft_config("tiny", init=str(base_checkpoint), out_dir=str(tmp_path / "w"), max_steps=2,
                           batch_size=4, sft_batch_size=4, n_pairs=40, n_eval_pairs=20, n_train=20, n_eval=2,
                           max_len=64, max_new_tokens=4, eval_every=2, ckpt_every=2, log_every=1,
                           warmup_steps=1, device="cpu")
    bench = _bench("hydra_vs_reward")
    table = bench.compare_loss_weights(cfg, bench.parse_weights("1:0.1,0.1:1"))
    assert list(table) == ["lm1.0-rm0.1", "lm0.1-rm1.0"]
    for name, (w_lm, w_rm) in zip(table, [(1.0, 0.1), (0.1, 1.0)]):
        assert 0.0 <= table[name]["eval_accuracy"] <= 1.0 and table[name]["eval_lm_loss"] > 0
        meta = load_checkpoint(tmp_path / "w" / name / "checkpoint").meta
        assert (meta["lm_weight"], meta["rm_weight"]) == (w_lm, w_rm)
    assert (tmp_path / "w" / "weights.json").exists()


# ---- benchmarks/hydra_memory.py: the CPU memory counter and the paper's ordering ----

def _bench(name: str = "hydra_memory"):
    """benchmarks/NAME.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_live_bytes_counts_new_storages_once_and_frees_them():
    weight = torch.zeros(100, 100)                          # 40,000 bytes, pre-existing
    with _bench().LiveBytes([weight]) as counter:
        assert counter.live == 40_000
        view = weight.t()                                   # a view: no new storage
        x = torch.ones(1000)                                # +4,000
        y = x[:10] * 2                                      # +40 (x[:10] is a view of x)
        assert counter.live == 44_040
        del x, y
        import gc
        gc.collect()
        assert counter.live == 40_000 and counter.peak == 44_040
    assert view.shape == (100, 100)


def test_benchmark_reproduces_the_papers_memory_ordering():
    bench = _bench()
    cfg = bench.BenchConfig(batch_size=4, prompt_len=8, new_tokens=8, minibatch_size=2, ppo_epochs=1,
                            lora_r=4, repeats=1)
    rows = {r["name"]: r for r in bench.measure(cfg, tiny_config())}
    peak = {k: r["peak_mb"] for k, r in rows.items()}
    assert peak["ppo"] > peak["lora"] > peak["hydra"] > peak["jhydra"], peak
    # full PPO holds at least 4 weights + 2x(grads + 2 Adam moments): over 8x one model's weights
    assert peak["ppo"] > 8 * rows["sft"]["weights_mb"] and peak["sft"] > 4 * rows["sft"]["weights_mb"]
    assert all(r["sec_per_sample"] > 0 for r in rows.values())
