"""The cubic sparsity schedule (by hand) and the distillation loss (by hand)."""

import math

import pytest
import torch

from minilm.prune.schedule import SparsitySchedule, distill_loss

pytestmark = pytest.mark.lesson_11


def test_cubic_schedule_values_by_hand():
    s = SparsitySchedule(final_density=0.5, total_steps=100, warmup_steps=10, final_steps=10)
    assert [s.density(t) for t in (0, 9, 10)] == [1.0, 1.0, 1.0]
    assert s.density(50) == pytest.approx(0.5 + 0.5 * 0.5 ** 3)       # 40 of 80 ramp steps
    assert s.density(30) == pytest.approx(0.5 + 0.5 * 0.75 ** 3)
    assert [s.density(t) for t in (90, 99, 150)] == [0.5, 0.5, 0.5]
    ds = [s.density(t) for t in range(100)]
    assert all(a >= b for a, b in zip(ds, ds[1:]))                      # never grows back


def test_density_changes_only_on_the_cadence():
    s = SparsitySchedule(final_density=0.5, total_steps=100, warmup_steps=10, final_steps=10, every=20)
    assert s.density(45) == pytest.approx(0.5 + 0.5 * (1 - 20 / 80) ** 3)   # rounded down to t=30
    assert len({s.density(t) for t in range(30, 50)}) == 1
    assert s.density(29) != s.density(30)


def test_schedule_without_a_ramp_is_an_error():
    with pytest.raises(ValueError, match="ramp"):
        SparsitySchedule(final_density=0.5, total_steps=20, warmup_steps=10, final_steps=10)


def test_distill_loss_by_hand_and_zero_for_equal_logits():
    teacher = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])                # (B=1, T=2, V=2)
    student = torch.tensor([[[math.log(3.0), 0.0], [-9.0, 9.0]]])
    valid = torch.tensor([[True, False]])                               # position 1 is ignored
    # KL([.5, .5] || [.75, .25]) = .5 ln(.5/.75) + .5 ln(.5/.25)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert distill_loss(student, teacher, valid, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    assert distill_loss(teacher, teacher, torch.ones(1, 2, dtype=torch.bool), 2.0).item() == pytest.approx(0.0, abs=1e-6)
