"""The shared post-training loop and SFT: exact resume, frozen parameters stay frozen, loss falls,
and the stage end to end on a tiny checkpoint."""

import json
from functools import partial

import pytest
import torch
from conftest import tiny_config

from minilm.checkpoint import load_checkpoint, save_checkpoint
from minilm.config import build
from minilm.loop import LoopConfig, OptimConfig, run_loop
from minilm.model import Phi3
from minilm.post.base_model import LoRAConfig, add_lora
from minilm.post.sft import make_batch_fn, render_examples, sft_loss
from minilm.stages.sft import SFTConfig, find_text_data, run_sft
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_06


def random_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)  # a pure function of the step
    x = torch.randint(0, 320, (4, 16), generator=g)
    return {"tokens": x, "targets": x.roll(-1, 1), "attention_mask": torch.ones_like(x)}


def lm_loss(model, batch):
    return model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])[1], {}


def fresh_model(lora_r: int = 0, dropout: float = 0.0) -> Phi3:
    torch.manual_seed(0)
    model = Phi3(tiny_config())
    if lora_r:
        add_lora(LoRAConfig(r=lora_r, dropout=dropout), model)
    return model


def post_config(out_dir, lora_r=0, lr=1e-2, warmup_steps=2, **kw) -> LoopConfig:
    """The loop's settings; `lora_r` only names the case (the model's adapters come from fresh_model)."""
    fields = dict(out_dir=str(out_dir), max_steps=6, ckpt_every=3, eval_every=3, log_every=1, device="cpu",
                  optim=OptimConfig(lr=lr, warmup_steps=warmup_steps))
    return LoopConfig(**{**fields, **kw})


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, lora_r):
    """Killed after step 4 (last checkpoint at 3), restarted: bit-identical to a run never killed.
    LoRA dropout 0.1 makes the result depend on the restored RNG state too."""
    evals = lambda m: {"val_probe": m(random_batch(99)["tokens"])[0].mean().item()}
    whole = fresh_model(lora_r, 0.1)
    run_loop(post_config(tmp_path / "a", lora_r), whole, random_batch, lm_loss, evals)

    def crash(step, row):
        if step == 4:
            raise KeyboardInterrupt
    first = fresh_model(lora_r, 0.1)
    with pytest.raises(KeyboardInterrupt):
        run_loop(post_config(tmp_path / "b", lora_r), first, random_batch, lm_loss, evals, on_step=crash)
    resumed = fresh_model(lora_r, 0.1)  # rebuilt from scratch, as a restarted process would
    summary = run_loop(post_config(tmp_path / "b", lora_r), resumed, random_batch, lm_loss, evals)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert summary["val_probe"] == rows[-1]["val_probe"]


def test_exactly_the_trainable_parameters_change(tmp_path):
    for lora_r in (0, 4):
        model = fresh_model(lora_r)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}  # tied: listed once
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        run_loop(post_config(tmp_path / f"r{lora_r}", lora_r, max_steps=3), model, random_batch,
                 lm_loss, None)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == trainable, (lora_r, changed ^ trainable)
        if lora_r:
            assert trainable and all("lora_" in n for n in trainable)


@pytest.fixture(scope="module")
def chat_examples(data_dir):
    from data_prep.instructions import instruction_examples
    tok = Tokenizer.load(data_dir)
    # short kinds: this test tokenizer spends a token per byte, and 64 positions hold few worked replies
    convs = instruction_examples(40, seed=0, sources=("dictionary", "ops1", "arithmetic", "units_short"),
                                 split="train")
    return tok, convs, render_examples(tok, convs, max_len=64)


def test_batches_are_pure_and_cover_each_example_once_per_epoch(chat_examples):
    tok, _, examples = chat_examples
    steps = len(examples) // 4                     # whole batches of 4 per epoch
    examples = examples[:steps * 4]
    assert steps >= 4
    batch_fn = make_batch_fn(examples, batch_size=4, seed=7, pad_id=tok.eot_id, max_len=64)
    assert all(torch.equal(a, b) for a, b in zip(batch_fn(3).values(), batch_fn(3).values()))
    for epoch in (0, 1):
        rows = []
        for step in range(epoch * steps, epoch * steps + steps):
            b = batch_fn(step)
            rows += [t[m.bool()].tolist() for t, m in zip(b["tokens"], b["attention_mask"])]
        assert sorted(rows) == sorted(ids for ids, _ in examples)
    assert batch_fn(0)["tokens"].tolist() != batch_fn(steps)["tokens"].tolist()  # a new order per epoch


def test_sft_loss_falls_on_chat_data(chat_examples, tmp_path):
    tok, _, examples = chat_examples
    batch_fn = make_batch_fn(examples[:16], batch_size=8, seed=0, pad_id=tok.eot_id, max_len=64)
    cfg = post_config(tmp_path, max_steps=40, ckpt_every=40, eval_every=40, lr=3e-3, warmup_steps=5)
    summary = run_loop(cfg, fresh_model(), batch_fn, sft_loss, None)
    assert summary["final_loss"] < 0.6 * summary["first_loss"], summary


def test_sft_loss_averages_only_the_masked_targets(chat_examples):
    tok, _, examples = chat_examples
    batch = make_batch_fn(examples, 4, 0, tok.eot_id, 64)(0)
    model = fresh_model()
    loss, metrics = sft_loss(model, batch)
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])[0]
    keep = batch["targets"] != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep]))
    assert metrics["target_tokens"] == keep.sum().item() and 0 <= metrics["pad_fraction"] < 1


@pytest.mark.parametrize("lora_r", [0, 2])
def test_run_sft_end_to_end(data_dir, tmp_path, lora_r):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", Phi3(tiny_config()), Tokenizer.load(data_dir),
                    meta={"stage": "pretrain"})
    cfg = build(SFTConfig, init=str(tmp_path / "base"), out_dir=str(tmp_path / "sft"), max_steps=4,
                    batch_size=4, n_train=40, n_eval=6, max_len=48, max_new_tokens=8, eval_every=2,
                    ckpt_every=2, device="cpu", lora_r=lora_r, text_data=str(data_dir),
                    text_batch_size=2)  # default text_mix 1.0; text_seq_len 128 cut to max_seq_len 64
    result = run_sft(cfg)
    for when in ("before", "after"):
        assert set(result[when]) >= {"end_rate", "form_rate", "correct_rate", "reward", "text_val_loss"}
        assert all(0.0 <= v <= 1.0 for k, v in result[when].items() if k != "text_val_loss")
        assert 0 < result[when]["text_val_loss"] < 10
    ck = load_checkpoint(tmp_path / "sft" / "checkpoint")
    assert ck.meta["stage"] == "sft" and ck.meta["step"] == 4 and "before" in ck.meta
    assert json.loads((tmp_path / "sft" / "eval.json").read_text())["after"] == result["after"]
    assert result["text_mix"] == 1.0 and result["text_data"] == str(data_dir)
    if lora_r:
        assert any("lora_" in n for n, _ in ck.model.named_parameters())


def test_a_lora_checkpoint_is_folded_in_when_a_stage_starts_from_it(tmp_path, data_dir):
    """DPO or PPO starting from an SFT-with-LoRA checkpoint: the SFT adapters become part of the
    starting weights, so `lora_disabled()` (the reference) is the SFT model, not the pretrained one."""
    from minilm.lora import lora_disabled
    from minilm.post.base_model import init_model
    tok = Tokenizer.load(data_dir)
    sft = fresh_model(lora_r=4)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_()                         # a trained adapter: B no longer zero
    x = torch.randint(0, 320, (2, 12))
    sft_logits = sft(x)[0]
    save_checkpoint(tmp_path / "sft", sft, tok)
    full, _ = init_model(str(tmp_path / "sft"))
    assert all(p.requires_grad for p in full.parameters())          # full fine-tune: all trainable
    assert torch.allclose(full(x)[0], sft_logits, atol=1e-5)
    policy, _ = init_model(str(tmp_path / "sft"), LoRAConfig(r=4))
    with lora_disabled(policy):
        assert torch.allclose(policy(x)[0], sft_logits, atol=1e-5)  # the reference is the SFT model


def test_epoch_batches_cover_every_example_once_per_epoch_and_depend_only_on_the_step():
    from minilm import MinilmError
    from minilm.loop import epoch_batches
    picks = epoch_batches(10, 5, seed=3)
    assert sorted(picks(0) + picks(1)) == list(range(10))      # epoch 0: each example once
    assert sorted(picks(2) + picks(3)) == list(range(10))      # epoch 1: a new permutation
    assert picks(0) + picks(1) != picks(2) + picks(3)
    assert epoch_batches(10, 5, seed=3)(1) == picks(1)         # rebuilt after a restart: same batch
    with pytest.raises(MinilmError, match="no training examples"):
        epoch_batches(0, 5, seed=3)


def mixed_batch_fn(chat_examples, data_dir, seed: int = 0):
    """SFT batches with clean-text windows (batch["text"]) drawn from the test data's train split."""
    from minilm.data import TokenDataset
    tok, _, examples = chat_examples
    return make_batch_fn(examples, 4, seed, tok.eot_id, 64, TokenDataset(data_dir, "train"),
                         text_batch_size=3, text_seq_len=16)


def test_text_mix_adds_the_weighted_clean_text_loss(chat_examples, data_dir):
    """total = masked chat CE + text_mix * plain next-token CE of the text windows, by hand."""
    batch = mixed_batch_fn(chat_examples, data_dir)(0)
    model = fresh_model()
    ce = torch.nn.functional.cross_entropy
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])[0]
    keep = batch["targets"] != -100
    chat = ce(logits[keep], batch["targets"][keep])
    x, y = batch["text"]["tokens"], batch["text"]["targets"]
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])  # next-token windows
    text = ce(model(x)[0].flatten(0, 1), y.flatten())
    loss, metrics = sft_loss(model, batch, text_mix=0.5)
    torch.testing.assert_close(loss, chat + 0.5 * text)
    assert metrics["text_loss"] == pytest.approx(text.item(), rel=1e-5)
    assert metrics["chat_loss"] == pytest.approx(chat.item(), rel=1e-5)
    off, off_metrics = sft_loss(model, batch)                      # text_mix 0: the windows are ignored
    torch.testing.assert_close(off, chat)
    assert "text_loss" not in off_metrics


def test_mixed_batches_are_a_pure_function_of_seed_and_step(chat_examples, data_dir):
    a, b = mixed_batch_fn(chat_examples, data_dir), mixed_batch_fn(chat_examples, data_dir)  # a "restart"
    assert torch.equal(a(5)["text"]["tokens"], b(5)["text"]["tokens"])
    assert torch.equal(a(5)["tokens"], b(5)["tokens"])
    assert not torch.equal(a(5)["text"]["tokens"], a(6)["text"]["tokens"])
    assert not torch.equal(a(5)["text"]["tokens"], mixed_batch_fn(chat_examples, data_dir, seed=1)(5)["text"]["tokens"])


@pytest.mark.parametrize("lora_r", [0, 4])
def test_text_mix_resume_is_exact_and_only_trainable_parameters_change(chat_examples, data_dir, tmp_path,
                                                                       lora_r):
    """Replay under LoRA must not leak into the frozen base; a killed, resumed mixed run is bit-identical."""
    loss_fn = partial(sft_loss, text_mix=0.5)
    whole = fresh_model(lora_r)
    before = {n: p.detach().clone() for n, p in whole.named_parameters()}
    run_loop(post_config(tmp_path / "a", lora_r), whole, mixed_batch_fn(chat_examples, data_dir), loss_fn, None)
    changed = {n for n, p in whole.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in whole.named_parameters() if p.requires_grad}

    def crash(step, row):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_loop(post_config(tmp_path / "b", lora_r), fresh_model(lora_r), mixed_batch_fn(chat_examples, data_dir),
                 loss_fn, None, on_step=crash)
    resumed = fresh_model(lora_r)
    run_loop(post_config(tmp_path / "b", lora_r), resumed, mixed_batch_fn(chat_examples, data_dir), loss_fn, None)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("text_loss" in r and "chat_loss" in r for r in rows)


def test_find_text_data_uses_what_the_init_was_pretrained_on(data_dir, tmp_path):
    from minilm import MinilmError
    tok = Tokenizer.load(data_dir)
    save_checkpoint(tmp_path / "base", fresh_model(), tok, {"train_config": {"data_dir": str(data_dir)}})
    assert find_text_data(build(SFTConfig, init=str(tmp_path / "base")), tok) == data_dir
    save_checkpoint(tmp_path / "bare", fresh_model(), tok)          # no record of its data: off
    assert find_text_data(build(SFTConfig, init=str(tmp_path / "bare")), tok) is None
    assert find_text_data(build(SFTConfig, init=str(tmp_path / "bare"), text_data=str(data_dir)), tok) == data_dir
    with pytest.raises(MinilmError, match="no prepared shards"):
        find_text_data(build(SFTConfig, init=str(tmp_path / "bare"), text_data=str(tmp_path)), tok)
    other = tmp_path / "other"                                      # shards of another tokenizer
    other.mkdir()
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0" * 16
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MinilmError, match="another tokenizer"):
        find_text_data(build(SFTConfig, init=str(tmp_path / "bare"), text_data=str(other)), tok)


def test_without_findable_text_the_replay_is_off_and_reported(data_dir, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "bare", Phi3(tiny_config()), Tokenizer.load(data_dir))
    cfg = build(SFTConfig, init=str(tmp_path / "bare"), out_dir=str(tmp_path / "sft"), text_mix=1.0, device="cpu",
                    max_steps=1, batch_size=2, n_train=8, n_eval=2, max_len=48, max_new_tokens=2)
    result = run_sft(cfg)
    assert result["text_mix"] == 0.0 and result["text_data"] is None
    assert "text_val_loss" not in result["after"]
