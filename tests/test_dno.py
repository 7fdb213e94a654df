"""DNO: both losses on hand-built tensors, large-margin pair selection, replay, the teacher, the
tabular intransitive-oracle demo, the bookkeeping of rows (pair statistics, best iterate), unended
replies, and a two-iteration run that resumes (lesson 09)."""

import json
import math
import random

import pytest
import torch
from test_reward import base_checkpoint  # noqa: F401

from minilm.config import override
from minilm.post.dno import (best_iterate, bradley_terry_fit, build_pairs, dno_regression_loss, expected_win_rates,
                             place_pair_stats, positive_nll, preference_entropy, replay_pairs, scripted_teacher,
                             select_pairs, tabular_dno)
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
    # the best of SFT, iter 1, iter 2 (SFT included: it is returned when no iterate beats it)
    assert s["best_iteration"] in (0, 1, 2) and (tmp_path / "dno" / "table.md").exists()
    assert s["best_checkpoint"] == (str(base_checkpoint) if s["best_iteration"] == 0 else
                                    str(tmp_path / "dno" / f"iter_{s['best_iteration']}" / "checkpoint"))
    # iteration t samples pi_t = rows[t - 1]: its pairs are logged there; the last iterate was never sampled
    assert all("n_new_pairs" in r and "share_student>teacher" in r for r in s["rows"][:2])
    assert "n_new_pairs" not in s["rows"][2] and "n_train_pairs" not in s["rows"][0]
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
    pairs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "r_chosen": 0.9, "r_rejected": 0.1,
              "chosen_positive": True},
             {"prompt": "What is 3 * 3?", "chosen": "9", "rejected": "6", "r_chosen": 0.7, "r_rejected": 0.4,
              "chosen_positive": True}]
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


SUM = {"kind": "arithmetic", "answer": "7000", "messages": [
    {"role": "user", "content": "What is 6999 + 1?"}, {"role": "assistant", "content": "7000"}]}
# K = 3 samples (text, judged) of pi_t and their VerifierOracle points: a correct reply that never
# closed its turn (5: no "ended" point), a near miss (4), a far miss cut off (1); the teacher is right (6)
STUDENTS = [[("7000", "7000<|endoftext|>"), ("7001", "7001<|end|>"), ("701", "701<|endoftext|>")]]


def _pairs(**cfg):
    from minilm.stages.dno import dno_config
    oracle = VerifierOracle([SUM])
    pairs, _ = build_pairs(dno_config("tiny", **cfg), oracle, oracle, [SUM["messages"][:1]], STUDENTS, ["7000"])
    return {(p["chosen"], p["rejected"]): p for p in pairs}


def test_nll_falls_only_on_chosen_replies_that_pass_the_positive_threshold():
    # rows: 2 tokens at -2 nats total (positive), 3 tokens at -6 (a wrong reply that won its pair)
    logp = torch.tensor([-2.0, -6.0], requires_grad=True)
    nll = positive_nll(logp, torch.tensor([2, 3]), torch.tensor([True, False]))
    assert nll.item() == pytest.approx(1.0)                      # 2 nats / 2 tokens; row 1 ignored
    nll.backward()
    assert logp.grad.tolist() == pytest.approx([-0.5, 0.0])
    none = positive_nll(logp, torch.tensor([2, 3]), torch.tensor([False, False]))
    assert none.item() == 0.0 and none.requires_grad


def test_all_pairs_mode_keeps_a_wrong_winner_as_a_pair_but_not_as_a_positive():
    pairs = _pairs(large_margin=False)
    # the near miss (4 points) beats the far miss (1): a DPO pair, but 4 < positive_min 5
    assert pairs[("7001", "701")]["chosen_positive"] is False
    assert pairs[("7000", "7001")]["chosen_positive"] is True     # the teacher's correct reply
    assert all(p["chosen_positive"] for p in _pairs().values())   # the filter keeps positives only


def test_dpo_plus_nll_adds_no_nll_for_a_chosen_reply_below_the_positive_threshold(data_dir):
    # policy == reference: DPO alone is log 2, so anything above it is the NLL term
    from conftest import tiny_config

    from minilm.model import Phi3
    from minilm.post.preferences import encode_pairs
    from minilm.stages.dno import dno_config, load_reference, make_batch_fn, make_loss_fn
    from minilm.tokenizer import Tokenizer
    tok, model = Tokenizer.load(data_dir), Phi3(tiny_config())
    cfg = dno_config("tiny", sft_weight=1.0)
    reference = load_reference(cfg, model, None)                     # a frozen copy of pi_t
    for positive, expect_nll in ((False, False), (True, True)):
        pairs = [{"prompt": "What is 2 + 2?", "chosen": "5", "rejected": "9", "r_chosen": 0.6, "r_rejected": 0.4,
                  "chosen_positive": positive}]
        encoded, kept = encode_pairs(tok, pairs, 64)
        loss, _ = make_loss_fn(cfg, reference)(model, make_batch_fn(encoded, kept, 1, 0, tok.eot_id, 64)(0))
        assert (loss.item() > math.log(2) + 1.0) is expect_nll
        if not expect_nll:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_pair_statistics_go_in_the_row_of_the_iterate_that_was_sampled():
    rows = [{"name": "SFT", "val_points": 3.0}]
    # iteration 1 samples pi_1 (SFT) and trains pi_2 ("iter 1")
    rows = place_pair_stats(rows, {"name": "iter 1", "n_train_pairs": 40}, {"n_new_pairs": 40, "share_a": 0.5})
    rows = place_pair_stats(rows, {"name": "iter 2", "n_train_pairs": 62}, {"n_new_pairs": 50, "share_a": 0.6})
    assert rows == [{"name": "SFT", "val_points": 3.0, "n_new_pairs": 40, "share_a": 0.5},
                    {"name": "iter 1", "n_train_pairs": 40, "n_new_pairs": 50, "share_a": 0.6},
                    {"name": "iter 2", "n_train_pairs": 62}]         # never sampled: no pair statistics


def test_best_iterate_is_the_sft_model_when_no_iterate_beats_it(tmp_path):
    rows = [{"name": "SFT", "val_points": 3.3}, {"name": "iter 1", "val_points": 3.1},
            {"name": "iter 2", "val_points": 3.3}]
    assert best_iterate(rows) == 0                                   # a tie does not beat SFT
    assert best_iterate(rows[:2] + [{"val_points": 3.4}]) == 2
    from minilm.stages.dno import dno_config, finish
    summary = finish(dno_config("tiny", init="runs/sft/checkpoint", out_dir=str(tmp_path)), rows)
    assert summary["best_iteration"] == 0 and summary["best_checkpoint"] == "runs/sft/checkpoint"


def test_a_reply_that_never_closed_its_turn_is_never_the_positive():
    # candidate 1 scored 6 but was cut off: it may lose a pair, never win one, filter on or off
    ended = [True, False, True]
    assert select_pairs([5, 6, 2], teacher_index=2, ended=ended) == [(0, 2, "student>teacher")]
    assert set(select_pairs([5, 6, 2], teacher_index=2, large_margin=False, ended=ended)) == {
        (0, 2, "student>teacher")}
    # in a DNO iteration: the correct but unended "7000" never wins; the cut-off "701" loses,
    # flagged so that it is trained without an <|end|>
    points = [VerifierOracle([SUM]).points(SUM["messages"][:1], judged) for _, judged in STUDENTS[0]]
    assert points == [5, 4, 1]                                       # 5 >= positive_min: the trap
    for large_margin in (True, False):
        pairs = _pairs(large_margin=large_margin)
        assert not any(p["chosen"] == "7000" and p["kind"] != "teacher>student" for p in pairs.values())
        assert pairs[("7000", "701")]["rejected_ended"] is False
        assert pairs[("7000", "7001")]["rejected_ended"] is True


def test_an_unended_reply_is_encoded_without_an_end_token_it_never_produced(data_dir):
    from minilm.post.preferences import encode_pair
    from minilm.tokenizer import Tokenizer
    tok = Tokenizer.load(data_dir)
    end = tok.special_id("<|end|>")
    pair = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4 4 4"}
    (c_ids, c_mask), (r_ids, r_mask) = encode_pair(tok, pair)
    (c2_ids, c2_mask), (cut_ids, cut_mask) = encode_pair(tok, {**pair, "rejected_ended": False})
    assert (c2_ids, c2_mask) == (c_ids, c_mask)                      # the chosen side is unchanged
    reply = tok.encode("4 4 4")
    assert cut_ids[-len(reply):] == reply and cut_mask[-len(reply):] == [1] * len(reply)
    assert cut_ids == r_ids[:len(cut_ids)] and r_ids[len(cut_ids)] == end   # ended: <|end|> learned next
    assert sum(cut_mask) == sum(r_mask) - 1 and cut_ids.count(end) == r_ids.count(end) - 1


def test_pairs_written_before_the_positive_flag_are_refused_with_a_way_on(tmp_path):
    from minilm import MinilmError
    from minilm.stages.dno import _read_pairs
    old = tmp_path / "pairs.json"
    old.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(MinilmError, match="older minilm.*new --out-dir"):
        _read_pairs(old)
    assert _read_pairs(tmp_path / "missing.json") == []
