"""DPO: the loss by hand, log 2 at the start, a planted preference learned, LoRA reference (lesson 07)."""

import copy
import math

import pytest
import torch
from conftest import tiny_config
from test_reward import base_checkpoint, changed, planted_pairs, snapshot, stage_config  # noqa: F401

from minilm.config import build
from minilm.generate import token_logprobs
from minilm.model import Phi3
from minilm.post.dpo import dpo_batch_loss, dpo_loss, sequence_logprobs
from minilm.post.preferences import pair_batch

pytestmark = pytest.mark.lesson_07


def test_dpo_loss_by_hand():
    pi_c, pi_r = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_c, ref_r = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.0])
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # pair 1: rewards 0.5 and -0.5, margin 1; pair 2: rewards -0.5 and 0, margin -0.5
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["chosen_reward"] == pytest.approx(0.0) and m["rejected_reward"] == pytest.approx(-0.25)
    assert m["margin"] == pytest.approx(0.25) and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.0)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pi_c, pi_r = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pi_c, pi_r, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)[0].backward()
    assert pi_c.grad.item() == pytest.approx(-0.05) and pi_r.grad.item() == pytest.approx(0.05)


def test_sequence_logprobs_sums_the_reply_tokens_and_ignores_padding():
    torch.manual_seed(0)
    model = Phi3(tiny_config()).eval()
    batch = pair_batch(planted_pairs(3, 0), pad_id=0, max_len=64)
    lp = sequence_logprobs(model, batch["tokens"], batch["attention_mask"], batch["loss_mask"])
    for row in range(6):
        n = int(batch["attention_mask"][row].sum())
        tokens = batch["tokens"][row:row + 1, :n]
        mask = batch["loss_mask"][row, :n]
        by_hand = (token_logprobs(model, tokens)[0] * mask).sum()  # the row alone, unpadded
        torch.testing.assert_close(lp[row], by_hand, atol=1e-5, rtol=0)
        assert mask.sum() >= 2 and mask[-1] == 1 and mask[0] == 0


def test_dpo_loss_is_log2_when_the_policy_is_the_reference():
    torch.manual_seed(0)
    policy = Phi3(tiny_config())
    reference = copy.deepcopy(policy).requires_grad_(False)
    loss, m = dpo_batch_loss(policy, pair_batch(planted_pairs(8, 0), 0, 64), beta=0.1, reference=reference)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["margin"] == 0 and m["chosen_reward"] == 0 and m["accuracy"] == 0.5


def prefers_good(model, pairs):
    """Fraction of prompts where the policy gives the planted GOOD ending a higher log-prob than BAD."""
    batch = pair_batch(pairs, 0, 64)
    with torch.no_grad():
        lp = sequence_logprobs(model, batch["tokens"], batch["attention_mask"], batch["loss_mask"])
    b = len(pairs)
    return (lp[:b] > lp[b:]).float().mean().item()


def train_dpo(policy, reference, steps=25, lr=1e-2, swap=False):
    """DPO on planted pairs (GOOD chosen; with swap, BAD chosen); returns the last step's metrics."""
    pairs = [planted_pairs(16, seed) for seed in range(4)]
    batches = [pair_batch([(r, c) for c, r in p] if swap else p, 0, 64) for p in pairs]
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss, metrics = dpo_batch_loss(policy, batches[step % 4], beta=0.5, reference=reference)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return metrics


def test_dpo_learns_a_planted_preference_with_a_frozen_copy():
    torch.manual_seed(0)
    policy = Phi3(tiny_config())
    train_dpo(policy, copy.deepcopy(policy), steps=10, swap=True)  # start preferring BAD everywhere
    reference = copy.deepcopy(policy).requires_grad_(False)
    held_out = planted_pairs(32, seed=99)
    assert prefers_good(policy, held_out) == 0.0
    ref_before = snapshot(reference)
    metrics = train_dpo(policy, reference)
    assert prefers_good(policy, held_out) == 1.0
    assert metrics["accuracy"] == 1.0 and metrics["margin"] > 1 and metrics["chosen_reward"] > 0
    assert not changed(reference, ref_before)  # the reference stays frozen


def test_dpo_with_lora_uses_the_base_model_as_reference():
    from minilm.lora import apply_lora, lora_disabled
    torch.manual_seed(0)
    policy = Phi3(tiny_config())
    base = copy.deepcopy(policy)
    apply_lora(policy, r=4, alpha=8.0)
    before = snapshot(policy)
    held_out = planted_pairs(32, seed=99)
    batch = pair_batch(held_out, 0, 64)
    # with fresh adapters (B = 0) the policy is the reference: loss log 2
    assert dpo_batch_loss(policy, batch, beta=0.1)[0].item() == pytest.approx(math.log(2), abs=1e-7)
    train_dpo(policy, reference=None, steps=20, lr=3e-2)
    assert prefers_good(policy, held_out) == 1.0
    assert changed(policy, before) == {n for n, p in policy.named_parameters() if "lora_" in n}
    with lora_disabled(policy):  # the reference the loss used is exactly the untouched base model
        assert prefers_good(policy, held_out) == prefers_good(base, held_out)
        torch.testing.assert_close(policy(batch["tokens"])[0], base(batch["tokens"])[0], atol=0, rtol=0)


@pytest.mark.parametrize("lora_r,pairs", [(0, "offline"), (2, "both")])
def test_run_dpo_end_to_end(base_checkpoint, tmp_path, lora_r, pairs):
    from minilm.checkpoint import load_checkpoint
    from minilm.stages.dpo import DPOConfig, run_dpo
    cfg = stage_config(DPOConfig, base_checkpoint, tmp_path / "dpo", lora_r=lora_r, n_judge=6,
                       max_new_tokens=6, lr=1e-2, pairs=pairs, n_sample_prompts=6, n_samples=3)
    result = run_dpo(cfg)
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    assert 0 <= result["eval_accuracy"] <= 1 and result["eval_margin"] != 0
    for side in ("sft", "dpo"):
        assert {"reward", "correct_rate", "form_rate", "end_rate"} <= set(result[side])
    assert 0 <= result["dpo_vs_sft"]["preferred_rate"] <= 1 and result["n_judge"] > 0
    ck = load_checkpoint(tmp_path / "dpo" / "checkpoint")
    assert ck.meta["stage"] == "dpo" and ck.meta["beta"] == 0.1
    assert any("lora_" in n for n, _ in ck.model.named_parameters()) == bool(lora_r)


def test_train_pairs_offline_sampled_and_both(base_checkpoint):
    from minilm.checkpoint import load_checkpoint
    from minilm.stages.dpo import DPOConfig, train_pairs
    ck = load_checkpoint(base_checkpoint)
    # stdlib answers: this random model's tokenizer was trained on stdlib docstrings, so its 6 sampled
    # tokens sometimes share words with the reference (F1 > 0), and not every pair ties
    kw = dict(n_pairs=30, n_sample_prompts=24, n_samples=4, max_new_tokens=6, data_seed=0,
              sources="stdlib,dictionary")
    got = {mode: train_pairs(build(DPOConfig, pairs=mode, **kw), ck.model, ck.tokenizer)
           for mode in ("offline", "sampled", "both")}
    assert got["sampled"] and all(p["reason"] == "sampled" and p["p"] > 0.5 for p in got["sampled"])
    assert got["both"] == got["offline"] + got["sampled"]
    assert not any(p["reason"] == "sampled" for p in got["offline"])
    with pytest.raises(Exception, match="offline, sampled or both"):
        train_pairs(build(DPOConfig, pairs="mine", **kw), ck.model, ck.tokenizer)


def test_dpo_cli_reports_bad_input(base_checkpoint, tmp_path, capsys):
    from minilm.cli import main
    # every call names an --out-dir under tmp_path: the default runs/dpo-tiny may hold a student's run
    assert main(["dpo", "--init", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "a")]) == 2
    assert "not a minilm checkpoint" in capsys.readouterr().err
    assert main(["dpo", "--init", str(base_checkpoint), "--beta", "0", "--out-dir", str(tmp_path / "b")]) == 2
    assert "beta must be a finite number > 0" in capsys.readouterr().err
    out = str(tmp_path / "credit")
    assert main(["dpo", "--init", str(base_checkpoint), "--out-dir", out, "--set", "credit=tokens"]) == 2
    assert "credit must be reply or step" in capsys.readouterr().err


def test_run_dpo_resumes_exactly(base_checkpoint, tmp_path):
    from minilm.checkpoint import load_checkpoint
    from minilm.stages.dpo import DPOConfig, run_dpo
    cfg = lambda out: stage_config(DPOConfig, base_checkpoint, tmp_path / out, n_judge=4,  # noqa: E731
                                   max_new_tokens=4, lr=1e-2, sft_weight=1.0)
    whole = run_dpo(cfg("a"))

    def crash(step, row):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_dpo(cfg("b"), on_step=crash)
    resumed = run_dpo(cfg("b"))  # from the step-2 checkpoint, with the reference rebuilt from init
    assert resumed["eval_margin"] == whole["eval_margin"] and resumed["dpo"] == whole["dpo"]
    a = load_checkpoint(tmp_path / "a" / "checkpoint").model.state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_credit_mask_keeps_the_replies_up_to_the_end_of_the_step_where_they_part():
    from minilm.post.preferences import credit_mask
    NL, END = 9, 8   # hand-built ids: 9 ends a line, 8 is <|end|>; 0 is padding
    #                     prompt | reply: "1 2 NL 3 4 NL 5 END" vs "1 2 NL 3 7 NL 6 END"
    chosen = torch.tensor([[5, 5, 1, 2, NL, 3, 4, NL, 5, END, 0]])
    rejected = torch.tensor([[5, 5, 1, 2, NL, 3, 7, NL, 6, END, 6]])
    tokens = torch.cat([chosen, rejected])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    credit = credit_mask(tokens, loss_mask, (NL, END))
    # they part at position 6 (4 vs 7); that step ends at the NL in position 7; the rest is cut
    expected = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert torch.equal(credit, expected)
    # identical replies never part: everything stays; no step end after the parting: the reply's end
    same = credit_mask(torch.cat([chosen, chosen]), loss_mask[:1].repeat(2, 1), (NL, END))
    assert torch.equal(same, loss_mask[:1].repeat(2, 1))
    to_end = credit_mask(tokens, loss_mask, (END,))   # only <|end|> ends a step: the whole replies
    assert torch.equal(to_end, loss_mask * (torch.arange(11) <= 9).long())


def test_step_credit_dpo_margin_is_the_parting_step_and_the_nll_reads_whole_replies():
    from minilm.post.preferences import credit_mask
    torch.manual_seed(0)
    policy, reference = Phi3(tiny_config()), Phi3(tiny_config()).requires_grad_(False)
    batch = pair_batch(planted_pairs(4, 0), 0, 64)
    b = 4
    ends = (int(batch["tokens"][0, -1]),)   # any id: the test checks the sums, not where lines end
    batch["credit_mask"] = credit_mask(batch["tokens"], batch["loss_mask"], ends)
    loss, m = dpo_batch_loss(policy, batch, beta=0.3, reference=reference, sft_weight=1.0)
    with torch.no_grad():
        lp = {name: token_logprobs(net, batch["tokens"], batch["attention_mask"])
              for name, net in (("pi", policy), ("ref", reference))}
    c, whole = batch["credit_mask"].float(), batch["loss_mask"].float()
    pi, ref = (lp["pi"] * c).sum(1), (lp["ref"] * c).sum(1)
    margin = 0.3 * ((pi[:b] - ref[:b]) - (pi[b:] - ref[b:]))
    nll = -(lp["pi"][:b] * whole[:b]).sum() / whole[:b].sum()
    torch.testing.assert_close(loss, (-torch.nn.functional.logsigmoid(margin).mean() + nll).float(), atol=1e-5, rtol=0)
    assert m["chosen_nll"] == pytest.approx(nll.item(), abs=1e-5)
