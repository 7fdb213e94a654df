"""DNO: both losses on hand-built tensors, large-margin pair selection, replay, the teacher, the
tabular intransitive-oracle demo, and a two-iteration run that resumes (lesson 09)."""

import json
import math
import random

import pytest
import torch
from test_reward import base_checkpoint  # noqa: F401

from minilm.config import override
from minilm.post.dno import (bradley_terry_fit, dno_regression_loss, expected_win_rates, preference_entropy,
                             replay_pairs, scripted_teacher, select_pairs, tabular_dno)
from minilm.post.dpo import dpo_loss
from minilm.post.oracles import RPS_TABLE, VerifierOracle

pytestmark = pytest.mark.lesson_09


def test_regression_loss_by_hand():
    pi_1, pi_2 = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
    ref_1, ref_2 = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0])
    r_1, r_2 = torch.tensor([0.9, 0.2]), torch.tensor([0.1, 0.6])
    loss, m = dno_regression_loss(pi_1, pi_2, ref_1, ref_2, r_1, r_2, eta=0.5)
    # Delta = 0.5 * ((1) - (-1)) = 1.0 and 0.5 * (0 - (-1)) = 0.5; labels sigmoid(0.8), sigmoid(-0.4)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-(sig(0.8) * math.log(sig(1.0)) + (1 - sig(0.8)) * math.log(sig(-1.0))),
                -(sig(-0.4) * math.log(sig(0.5)) + (1 - sig(-0.4)) * math.log(sig(-0.5)))]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert m["delta"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="eta"):
        dno_regression_loss(pi_1, pi_2, ref_1, ref_2, r_1, r_2, eta=0.0)


def test_regression_loss_is_minimised_at_the_soft_policy_iteration_target():
    # gradient zero exactly when eta * log-ratio gap = r_1 - r_2 (pi ∝ pi_t exp(r / eta))
    r_1, r_2, eta = torch.tensor([0.7]), torch.tensor([0.2]), 0.1
    pi_1 = torch.tensor([(0.7 - 0.2) / eta], requires_grad=True)
    loss, _ = dno_regression_loss(pi_1, torch.zeros(1), torch.zeros(1), torch.zeros(1), r_1, r_2, eta)
    loss.backward()
    assert pi_1.grad.abs().item() < 1e-6
    pi_1 = torch.tensor([0.0], requires_grad=True)          # below target: pushed up
    dno_regression_loss(pi_1, torch.zeros(1), torch.zeros(1), torch.zeros(1), r_1, r_2, eta)[0].backward()
    assert pi_1.grad.item() < 0


def test_practical_loss_is_dpo_with_the_previous_iterate_as_reference():
    # Algorithm 2's loss: dpo_loss with ref = pi_t; at pi = pi_t it is log 2 for any pair
    pi_c, pi_r = torch.tensor([-1.5, -7.0]), torch.tensor([-2.5, -0.5])
    loss, m = dpo_loss(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and m["accuracy"] == 0.5
    # one step of 0.1 nats up on the chosen side: -log sigmoid(0.1 * 0.1)
    loss, _ = dpo_loss(pi_c + 0.1, pi_r, pi_c, pi_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.01)), abs=1e-6)


def test_large_margin_selection_on_hand_built_scores():
    # candidates 0-4 are students, 5 is the teacher
    scores = [6, 4, 3, 5, 2, 6]
    got = set(select_pairs(scores, teacher_index=5))
    teacher = {(5, j, "teacher>student") for j in (1, 2, 4)}     # >= 2 below the teacher's 6
    student = {(0, j, "student>student") for j in (1, 2, 3, 4)} | {(3, j, "student>student") for j in (1, 2, 4)}
    assert got == teacher | student                             # 0 vs 5: both 6, no pair
    # a student beating a wrong teacher
    assert (0, 2, "student>teacher") in select_pairs([6, 3, 4], teacher_index=2)
    # no positive reaches 5: no pairs at all; the filter off pairs every decided comparison
    assert select_pairs([4, 3, 2], teacher_index=2) == []
    assert set(select_pairs([4, 3, 2], teacher_index=2, large_margin=False)) == {
        (0, 1, "student>student"), (0, 2, "student>teacher"), (1, 2, "student>teacher")}
    assert select_pairs([6, 2], texts=["7", "7"]) == []           # identical replies never paired


def test_replay_keeps_a_decaying_share():
    earlier = [[{"i": i} for i in range(100)], [{"j": i} for i in range(100)], [{"k": i} for i in range(100)]]
    out = replay_pairs(earlier, shares=(0.3, 0.15), seed=0)
    counts = [sum(key in p for p in out) for key in ("i", "j", "k")]
    assert counts == [30, 15, 7]                                 # past the list: the share halves
    assert replay_pairs(earlier, seed=0) == out and replay_pairs([], seed=0) == []


def test_scripted_teacher_is_good_but_not_perfect():
    conv = {"kind": "units", "answer": "7000", "messages": [
        {"role": "user", "content": "How many metres are in 7 kilometres?"},
        {"role": "assistant", "content": "7000"}]}
    oracle, rng = VerifierOracle([conv]), random.Random(0)
    q = conv["messages"][:1]
    points = [oracle.points(q, scripted_teacher(conv, rng, 0.25)) for _ in range(400)]
    wrong = sum(p < 5 for p in points) / len(points)
    assert 0.18 < wrong < 0.32 and max(p for p in points if p < 5) <= 4
    assert all(scripted_teacher(conv, rng, 0.0) == "7000" for _ in range(20))


def test_expected_win_rates_against_the_students_only():
    prefer = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.5, 0.0], [1.0, 1.0, 0.5]])
    r = expected_win_rates(prefer, torch.tensor([True, True, False]))
    assert r.tolist() == [1.0, 0.0, 1.0]       # the teacher (index 2) is not an opponent


def test_bradley_terry_cannot_fit_a_cycle_but_fits_a_ranking():
    cyclic = torch.tensor(RPS_TABLE)
    _, loss = bradley_terry_fit(cyclic)
    assert loss > preference_entropy(cyclic) + 0.1               # 0.68 vs 0.48 nats
    ranking = torch.tensor([[0.5, 0.8, 0.9], [0.2, 0.5, 0.7], [0.1, 0.3, 0.5]])
    _, loss = bradley_terry_fit(ranking)
    assert loss == pytest.approx(preference_entropy(ranking), abs=0.02)


def test_dno_average_approaches_the_von_neumann_winner():
    # table margins 0.4 (paper > rock), 0.3 (rock > scissors), 0.2 (scissors > paper):
    # M p = 0 gives p ∝ (1, 1.5, 2)
    nash = torch.tensor([1.0, 1.5, 2.0]) / 4.5
    out = tabular_dno(torch.tensor(RPS_TABLE), iterations=300, eta=2.0)
    assert (out["average"] - nash).abs().max() < 0.03
    assert (out["last"] - nash).abs().max() > 0.1                # the last iterate keeps cycling
    # Algorithm 1's regression reaches the exact soft-policy-iteration target
    exact = tabular_dno(torch.tensor(RPS_TABLE), iterations=1, eta=1.0)["last"]
    fitted = tabular_dno(torch.tensor(RPS_TABLE), iterations=1, eta=1.0, fit_steps=300)["last"]
    assert (exact - fitted).abs().max() < 1e-3


def test_run_dno_two_iterations_keeps_every_checkpoint_and_resumes(base_checkpoint, tmp_path):  # noqa: F811
    from minilm.stages.dno import dno_config, run_dno
    cfg = dict(init=str(base_checkpoint), out_dir=str(tmp_path / "dno"), iterations=2, n_prompts=8,
               samples=2, n_val=4, n_test=6, batch_size=4, max_new_tokens=6, max_len=64, device="cpu",
               sources="arithmetic")
    s = run_dno(dno_config("tiny", **cfg))
    assert [r["name"] for r in s["rows"]] == ["SFT", "iter 1", "iter 2"]
    for t in (1, 2):
        assert (tmp_path / "dno" / f"iter_{t}" / "checkpoint" / "config.json").exists()
    assert s["best_iteration"] in (1, 2) and (tmp_path / "dno" / "table.md").exists()
    row = s["rows"][2]
    assert row["oracle_calls"] > s["rows"][1]["oracle_calls"] > 0 and 0 <= row["vs_sft"]["win_rate"] <= 1
    stamp = (tmp_path / "dno" / "iter_2" / "checkpoint" / "config.json").stat().st_mtime
    again = run_dno(dno_config("tiny", **cfg))                   # finished iterations are read back
    assert json.dumps(again["rows"]) == json.dumps(s["rows"])
    assert (tmp_path / "dno" / "iter_2" / "checkpoint" / "config.json").stat().st_mtime == stamp
    from minilm import MinilmError
    with pytest.raises(MinilmError, match="n_prompts 8 -> 9"):   # other prompts must not mix in
        run_dno(dno_config("tiny", **{**cfg, "n_prompts": 9}))


def test_cli_dno_rejects_bad_input_and_runs_the_cyclic_demo(capsys):
    from minilm.cli import main
    assert main(["dno", "--loss", "nope", "--init", "x"]) == 2
    assert "loss must be one of" in capsys.readouterr().err
    assert main(["dno", "--oracle", "cyclic", "--iterations", "50"]) == 0
    assert "von Neumann winner" in capsys.readouterr().out


def test_loss_options_at_the_start_of_an_iteration(data_dir):
    # policy == reference (pi_t): DPO and Algorithm 1 are both log 2 whatever the labels; "sft"
    # is the NLL per token of the chosen replies; a frozen copy or LoRA-off is the reference
    import copy

    from conftest import tiny_config

    from minilm.model import Phi3
    from minilm.post.preferences import encode_pairs
    from minilm.stages.dno import dno_config, load_reference, make_batch_fn, make_loss_fn
    from minilm.tokenizer import Tokenizer
    tok = Tokenizer.load(data_dir)
    model = Phi3(tiny_config())
    pairs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "r_chosen": 0.9, "r_rejected": 0.1},
             {"prompt": "What is 3 * 3?", "chosen": "9", "rejected": "6", "r_chosen": 0.7, "r_rejected": 0.4}]
    encoded, kept = encode_pairs(tok, pairs, 64)
    batch = make_batch_fn(encoded, kept, 2, 0, tok.eot_id, 64)(0)
    assert sorted(batch["r"].tolist()) == pytest.approx([0.1, 0.4, 0.7, 0.9])
    cfg = dno_config("tiny", sft_weight=0.0)
    reference = load_reference(cfg, model, None)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert not any(p.requires_grad for p in reference.parameters())
    for loss in ("dpo", "regression"):
        value, _ = make_loss_fn(override(cfg, loss=loss), reference)(model, batch)
        assert value.item() == pytest.approx(math.log(2), abs=1e-5)
    nll, _ = make_loss_fn(override(cfg, loss="sft"), reference)(model, batch)
    assert nll.item() > 1.0
    assert load_reference(override(cfg, lora_r=4), model, None) is None      # LoRA off
    sft = copy.deepcopy(model)
    assert load_reference(override(cfg, reference="sft"), model, sft) is sft
