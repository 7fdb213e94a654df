"""Reward model: Bradley-Terry loss, a planted preference, Hydra-SFT and LoRA updates (lesson 07)."""

import math

import pytest
import torch
from conftest import tiny_config

from minilm.config import build
from minilm.model import Phi3
from minilm.post.heads import HydraModel
from minilm.post.preferences import pair_batch
from minilm.post.reward import bradley_terry_loss, reward_loss

pytestmark = pytest.mark.lesson_07
GOOD, BAD = 41, 42  # the planted preference: replies ending with GOOD beat replies ending with BAD


def planted_pairs(n, seed):
    """Encoded pairs (ids, loss mask) whose replies differ only in their last token."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(50, 300, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        reply = torch.randint(50, 300, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        side = lambda last: (prompt + reply + [last], [0] * len(prompt) + [1] * (len(reply) + 1))  # noqa: E731
        pairs.append((side(GOOD), side(BAD)))
    return pairs


def test_bradley_terry_by_hand():
    loss, acc = bradley_terry_loss(torch.zeros(4), torch.zeros(4))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and acc.item() == 0.5
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, acc = bradley_terry_loss(chosen, rejected)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6) and acc.item() == 0.5
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    torch.testing.assert_close(chosen.grad, torch.full((3,), -0.5 / 3))


def train(model, params, batches, loss_fn, steps, lr=1e-2):
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss, metrics = loss_fn(model, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return metrics


def test_reward_model_learns_a_planted_preference():
    torch.manual_seed(0)
    hydra = HydraModel(Phi3(tiny_config()))
    batches = [pair_batch(planted_pairs(16, seed), pad_id=0, max_len=64) for seed in range(4)]
    held_out = pair_batch(planted_pairs(32, seed=99), pad_id=0, max_len=64)
    with torch.no_grad():
        before = reward_loss(hydra, held_out)[1]
    train(hydra, hydra.parameters(), batches, reward_loss, steps=30)
    with torch.no_grad():
        after = reward_loss(hydra, held_out)[1]
    # the fresh head scores everything near 0 (its accuracy is a coin flip shared by all pairs,
    # since they differ only in their last token); training must make the margin large
    assert abs(before["bt_loss"] - math.log(2)) < 0.05 and abs(before["margin"]) < 0.05
    assert after["accuracy"] == 1.0 and after["bt_loss"] < 0.2 and after["margin"] > 2


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_hydra_sft_step_trains_both_heads_and_the_trunk():
    torch.manual_seed(0)
    hydra = HydraModel(Phi3(tiny_config(tie_embeddings=False)))
    batch = pair_batch(planted_pairs(8, 0), pad_id=0, max_len=64)
    before = snapshot(hydra)
    loss, metrics = reward_loss(hydra, batch, lm_weight=1.0)
    assert metrics["lm_loss"] > 0 and loss.item() == pytest.approx(metrics["bt_loss"] + metrics["lm_loss"], rel=1e-5)
    loss.backward()
    torch.optim.SGD(hydra.parameters(), lr=0.1).step()
    moved = changed(hydra, before)
    assert {"heads.reward.weight", "lm.lm_head.weight"} <= moved
    # Bradley-Terry sees only score differences, so the head's bias gets exactly zero gradient
    assert "heads.reward.bias" not in moved and hydra.heads.reward.bias.grad.abs().max() == 0
    assert "lm.model.layers.0.self_attn.qkv_proj.weight" in moved and "lm.model.embed_tokens.weight" in moved


def test_hydra_lm_loss_covers_chosen_replies_only():
    torch.manual_seed(0)
    hydra = HydraModel(Phi3(tiny_config()))
    batch = pair_batch(planted_pairs(4, 0), pad_id=0, max_len=64)
    _, metrics = reward_loss(hydra, batch, lm_weight=1.0)
    b = batch["tokens"].shape[0] // 2
    targets = batch["targets"].clone()
    targets[b:] = -100
    assert metrics["lm_loss"] == pytest.approx(hydra.lm(batch["tokens"], targets)[1].item(), rel=1e-5)


def test_with_lora_only_adapters_and_the_head_change():
    from minilm.lora import apply_lora
    torch.manual_seed(0)
    lm = Phi3(tiny_config())
    apply_lora(lm, r=4, alpha=8.0)
    hydra = HydraModel(lm)
    trainable = {n for n, p in hydra.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    batch = pair_batch(planted_pairs(8, 0), pad_id=0, max_len=64)
    before = snapshot(hydra)
    params = [p for p in hydra.parameters() if p.requires_grad]
    train(hydra, params, [batch], lambda m, b: reward_loss(m, b, lm_weight=1.0), steps=2)
    moved = changed(hydra, before)
    # every adapter parameter and the head's weight moved, nothing else did (the bias cannot:
    # Bradley-Terry is blind to a shift of every score)
    assert moved == trainable - {"heads.reward.bias"}


@pytest.fixture(scope="module")
def base_checkpoint(data_dir, tmp_path_factory):
    from minilm.checkpoint import save_checkpoint
    from minilm.tokenizer import Tokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "checkpoint"
    save_checkpoint(path, Phi3(tiny_config()), Tokenizer.load(data_dir), meta={"stage": "pretrain"})
    return path


def stage_config(cls, init, out_dir, **kw):
    fields = dict(init=str(init), out_dir=str(out_dir), max_steps=4, batch_size=4, n_pairs=60,
                  n_eval_pairs=40, max_len=64, eval_every=2, ckpt_every=2, log_every=1, device="cpu",
                  warmup_steps=1)
    return build(cls, **{**fields, **kw})


def test_run_reward_resumes_exactly_and_saves_its_heads(base_checkpoint, tmp_path):
    from minilm.post.reward import load_reward_model
    from minilm.stages.reward import RewardConfig, run_reward
    cfg = lambda out: stage_config(RewardConfig, base_checkpoint, tmp_path / out, lm_weight=1.0)  # noqa: E731
    whole = run_reward(cfg("a"))

    def crash(step, row):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_reward(cfg("b"), on_step=crash)
    resumed = run_reward(cfg("b"))  # restarts from the step-2 checkpoint
    assert resumed["after"] == whole["after"] and resumed["before"] == whole["before"]
    assert 0 <= whole["after"]["eval_accuracy"] <= 1 and whole["n_heldout_pairs"] > 0
    a, tok = load_reward_model(tmp_path / "a" / "checkpoint")
    b, _ = load_reward_model(tmp_path / "b" / "checkpoint")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    fresh = HydraModel(Phi3(tiny_config()))
    assert not torch.equal(a.heads.reward.weight, fresh.heads.reward.weight)  # the trained head came back


def test_run_reward_with_lora_trains_adapters_and_head_only(base_checkpoint, tmp_path):
    from minilm.checkpoint import load_checkpoint
    from minilm.post.reward import load_reward_model
    from minilm.stages.reward import RewardConfig, run_reward
    run_reward(stage_config(RewardConfig, base_checkpoint, tmp_path / "r", lora_r=2, max_steps=2))
    base = load_checkpoint(base_checkpoint).model
    ck = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert ck.meta["stage"] == "reward" and ck.meta["heads"] == ["reward"]
    saved = ck.model.state_dict()
    assert any("lora_" in n for n in saved)
    for name, p in base.state_dict().items():
        assert torch.equal(p, saved[name]), name  # the base weights are untouched
    hydra, _ = load_reward_model(tmp_path / "r" / "checkpoint")  # adapters folded into the base
    assert not any("lora_" in n for n, _ in hydra.named_parameters())


def test_reward_cli(base_checkpoint, tmp_path, capsys):
    from minilm.cli import main
    args = ["reward", "--init", str(base_checkpoint), "--out-dir", str(tmp_path / "cli"), "--max-steps", "2",
            "--batch-size", "2", "--n-pairs", "30", "--n-eval-pairs", "20", "--max-len", "64",
            "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval_accuracy" in out and "heads.safetensors" in out
    assert main(["reward", "--init", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "none")]) == 2
    assert "not a minilm checkpoint" in capsys.readouterr().err
