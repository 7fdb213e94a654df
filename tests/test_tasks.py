"""Implement-it tasks (lesson 00): re-write a library function in lessons/tasks/, check it here.

    pytest -m task_01      lessons/tasks/task_01_rope.py           vs minilm.model.apply_rope
    pytest -m task_02      lessons/tasks/task_02_bpe_pairs.py      vs minilm.bpe_train.count_pairs
    pytest -m task_03      lessons/tasks/task_03_online_softmax.py vs torch.softmax
    pytest -m task_04      lessons/tasks/task_04_dpo_loss.py       vs minilm.post.dpo.dpo_loss
    pytest -m task_05      lessons/tasks/task_05_gae.py            vs minilm.post.ppo.gae
    pytest -m task_06      lessons/tasks/task_06_dno_pairs.py      vs minilm.post.dno.select_pairs

A task's checks (tests named test_task_NN_...) run only when `-m` names a task marker; a plain
`pytest` deselects them (tests/conftest.py), since the shipped files are stubs that raise
NotImplementedError. Three tests always run and prove the checks have teeth: each stub as shipped
fails them, each task's function replaced by the library's own passes them, and each replaced by
a classic mistake fails them. Task 03 has no library function of its own: its reference is
torch.softmax, and flash_forward() in minilm/ops/tiled.py holds the same loop.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minilm.model import apply_rope, rope_tables
from minilm.post.dno import select_pairs
from minilm.post.dpo import dpo_loss
from minilm.post.ppo import gae
from minilm.bpe_train import count_chunks, count_pairs, learn_merges

TASK_DIR = Path(__file__).resolve().parent.parent / "lessons" / "tasks"


def _softmax_reference(x: torch.Tensor, block: int = 4) -> torch.Tensor:
    """torch's softmax with the task's signature: the specification of task 03."""
    return torch.softmax(x, dim=-1)


# task: (file in lessons/tasks, function name, the library's function with the same signature)
TASKS = {
    "task_01": ("task_01_rope", "apply_rope", apply_rope),
    "task_02": ("task_02_bpe_pairs", "count_pairs", count_pairs),
    "task_03": ("task_03_online_softmax", "online_softmax", _softmax_reference),
    "task_04": ("task_04_dpo_loss", "dpo_loss", dpo_loss),
    "task_05": ("task_05_gae", "gae", gae),
    "task_06": ("task_06_dno_pairs", "select_pairs", select_pairs),
}
LESSON_OF = {"task_01": "lesson_01", "task_02": "lesson_02", "task_03": "lesson_04",
             "task_04": "lesson_07", "task_05": "lesson_08", "task_06": "lesson_09"}
_MODULES: dict[str, object] = {}


def _module(task: str):
    """The student's file for `task`, loaded once per session (monkeypatch replaces its function)."""
    file = TASKS[task][0]
    if file not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"minilm_tasks.{file}", TASK_DIR / f"{file}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[file] = module
    return _MODULES[file]


def student(task: str):
    """The function the student writes for `task`, looked up at call time."""
    return getattr(_module(task), TASKS[task][1])


# Task 01: RoPE

def _rope_inputs(b, h, t, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos, sin = rope_tables(d, 64, 10000.0)                                   # (64, D) each
    positions = torch.randint(0, 64, (b, t), generator=g)                   # per-row positions
    x = torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype)
    return x, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)      # (B, 1, T, D) tables


@pytest.mark.task_01
def test_task_01_rope_equals_the_librarys_on_random_heads():
    for shape in ((2, 4, 7, 16), (1, 2, 5, 2), (3, 1, 1, 64)):
        x, cos, sin = _rope_inputs(*shape)
        assert torch.allclose(student("task_01")(x, cos, sin), apply_rope(x, cos, sin), atol=1e-12), shape


@pytest.mark.task_01
def test_task_01_rope_rotates_the_two_halves_by_hand():
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])                              # (1, 1, 1, 4): pairs (1, 3), (2, 4)
    ones, zeros = torch.ones(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)
    assert student("task_01")(x, ones, zeros).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]    # angle 0
    assert student("task_01")(x, zeros, ones).flatten().tolist() == [-3.0, -4.0, 1.0, 2.0]  # angle pi/2
    c, s = math.cos(0.5), math.sin(0.5)
    got = student("task_01")(x, torch.full((1, 1, 1, 4), c), torch.full((1, 1, 1, 4), s)).flatten()
    assert torch.allclose(got, torch.tensor([c - 3 * s, 2 * c - 4 * s, 3 * c + s, 4 * c + 2 * s]))


@pytest.mark.task_01
def test_task_01_rope_keeps_lengths_and_dtype_and_scores_depend_on_distance_only():
    x, cos, sin = _rope_inputs(2, 3, 6, 8)
    out = student("task_01")(x, cos, sin)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-12)      # a rotation keeps lengths
    xb, cosb, sinb = _rope_inputs(1, 2, 3, 8, dtype=torch.bfloat16)          # tables stay float32
    assert student("task_01")(xb, cosb, sinb).dtype == torch.bfloat16
    table_cos, table_sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def at(v, pos):    # v turned to position pos
        return student("task_01")(v, table_cos[pos].view(1, 1, 1, 8), table_sin[pos].view(1, 1, 1, 8))

    def score(m, n):   # query at position m, key at position n
        return (at(q, m) * at(k, n)).sum().item()

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)


# Task 02: BPE pair counts

def _nonzero(counts) -> dict:
    return {pair: n for pair, n in dict(counts).items() if n}


@pytest.mark.task_02
def test_task_02_pair_counts_by_hand():
    h, u, g, p, a = (ord(ch) for ch in "hugpa")
    assert _nonzero(student("task_02")(Counter({b"hug": 3, b"pug": 1}))) == {(h, u): 3, (u, g): 4, (p, u): 1}
    assert _nonzero(student("task_02")(Counter({b"aaa": 1}))) == {(a, a): 2}
    assert _nonzero(student("task_02")(Counter({b"a": 5}))) == {}
    assert _nonzero(student("task_02")(Counter())) == {}
    assert _nonzero(student("task_02")({" é".encode(): 2})) == {(32, 0xC3): 2, (0xC3, 0xA9): 2}  # bytes, not letters


@pytest.mark.task_02
def test_task_02_pair_counts_equal_the_tokenizers_on_a_real_text():
    text = (Path(__file__).resolve().parent.parent / "lessons" / "02_tokenizer.md").read_text()
    chunks = count_chunks([text])
    assert _nonzero(student("task_02")(chunks)) == _nonzero(count_pairs(chunks))


@pytest.mark.task_02
def test_task_02_the_most_frequent_pair_is_the_first_merge():
    for texts in (["hug hug hug pug pun bun"], ["aaa aaa bb"], [Path(__file__).read_text()]):
        chunks = count_chunks(texts)
        counts = _nonzero(student("task_02")(chunks))
        best = min(counts, key=lambda pair: (-counts[pair], pair))           # highest count, then smallest pair
        assert learn_merges(chunks, 1) == [(bytes([best[0]]), bytes([best[1]]))]


# Task 03: online softmax

@pytest.mark.task_03
def test_task_03_online_softmax_equals_torch_for_every_block_size():
    x = torch.randn(3, 5, 37, dtype=torch.float64) * 4
    for block in (1, 2, 4, 16, 37, 64):
        assert torch.allclose(student("task_03")(x, block), torch.softmax(x, -1), atol=1e-12), block


@pytest.mark.task_03
def test_task_03_online_softmax_by_hand_and_with_huge_scores():
    x = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert torch.allclose(student("task_03")(x, 1), torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    big = torch.tensor([[1000.0, 1001.0, 999.0, 1002.0, 998.0]], dtype=torch.float64)  # exp overflows
    out = student("task_03")(big, 2)
    assert torch.isfinite(out).all() and torch.allclose(out, torch.softmax(big, -1), atol=1e-12)


@pytest.mark.task_03
def test_task_03_online_softmax_gives_masked_entries_zero_even_in_leading_blocks():
    inf = float("inf")
    x = torch.tensor([[-inf, -inf, -inf, -inf, 1.0, 2.0, -inf],
                      [3.0, -inf, -inf, -inf, -inf, -inf, 0.5]], dtype=torch.float64)
    for block in (1, 2, 3, 4):
        out = student("task_03")(x.clone(), block)
        assert not out.isnan().any(), block
        assert torch.allclose(out, torch.softmax(x, -1), atol=1e-12), block
        assert (out[x == -inf] == 0).all()


# Task 04: the DPO loss

def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _dpo_inputs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


@pytest.mark.task_04
def test_task_04_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logp = torch.tensor([-3.0, -7.5, -1.0], dtype=torch.float64)
    loss, metrics = student("task_04")(logp, logp - 2, logp, logp - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 0 and metrics["chosen_reward"] == 0


@pytest.mark.task_04
def test_task_04_dpo_loss_by_hand():
    # pi - ref: chosen +2, rejected -2; beta 0.5: rewards +1 and -1, margin 2
    loss, metrics = student("task_04")(_t(-8.0), _t(-12.0), _t(-10.0), _t(-10.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)))      # -log sigmoid(2) = 0.1269
    assert metrics == pytest.approx({"chosen_reward": 1.0, "rejected_reward": -1.0, "margin": 2.0, "accuracy": 1.0})
    with pytest.raises(ValueError):
        student("task_04")(_t(-1.0), _t(-1.0), _t(-1.0), _t(-1.0), beta=0.0)


@pytest.mark.task_04
def test_task_04_dpo_loss_metrics_and_gradients_equal_the_librarys():
    inputs, mine = _dpo_inputs(), _dpo_inputs()
    loss, metrics = dpo_loss(*inputs, beta=0.3)
    got, got_metrics = student("task_04")(*mine, beta=0.3)
    assert got.item() == pytest.approx(loss.item(), abs=1e-12)
    assert got_metrics == pytest.approx(metrics, abs=1e-12)
    loss.backward()
    got.backward()
    for ours, theirs in zip(mine[:2], inputs[:2]):                            # the policy's gradients
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-12)
    assert mine[2].grad is None and mine[3].grad is None, "the reference must be detached"


# Task 05: GAE

@pytest.mark.task_05
def test_task_05_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 9.0]])                           # 9: prompt and padding, ignored
    mask = torch.tensor([[0, 1, 1, 0]])
    adv, ret = student("task_05")(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: delta = 1.0 - 0.4 = 0.6 = A_2;  t=1: delta = 0.5 + 0.4 - 0.2 = 0.7, A_1 = 0.7 + 0.5 * 0.6 = 1.0
    assert torch.allclose(adv, torch.tensor([[0.0, 1.0, 0.6, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.2, 1.0, 0.0]]))


@pytest.mark.task_05
def test_task_05_gae_equals_the_librarys_on_ragged_rollouts():
    g = torch.Generator().manual_seed(1)
    b, t = 5, 11
    mask = torch.zeros(b, t)
    for row, (start, length) in enumerate([(2, 9), (5, 3), (0, 11), (7, 1), (3, 6)]):
        mask[row, start:start + length] = 1                                  # prompt, reply, padding
    rewards = torch.randn(b, t, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    for m in (mask.double(), mask.bool(), mask.long()):
        for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)):
            ours, theirs = student("task_05")(rewards, values, m, gamma, lam), gae(rewards, values, m, gamma, lam)
            assert torch.allclose(ours[0], theirs[0], atol=1e-12) and torch.allclose(ours[1], theirs[1], atol=1e-12)


@pytest.mark.task_05
def test_task_05_gae_outputs_carry_no_gradient():
    values = torch.randn(2, 4, requires_grad=True)
    adv, ret = student("task_05")(torch.randn(2, 4), values, torch.ones(2, 4))
    assert not adv.requires_grad and not ret.requires_grad


# Task 06: DNO's pair filter

def _pairs(*args, **kwargs):
    return sorted(student("task_06")(*args, **kwargs))


@pytest.mark.task_06
def test_task_06_large_margin_pairs_on_the_lessons_hand_built_scores():
    teacher = [(5, j, "teacher>student") for j in (1, 2, 4)]                  # >= 2 below the teacher's 6
    students = [(0, j, "student>student") for j in (1, 2, 3, 4)] + [(3, j, "student>student") for j in (1, 2, 4)]
    assert _pairs([6, 4, 3, 5, 2, 6], teacher_index=5) == sorted(teacher + students)
    assert (0, 2, "student>teacher") in _pairs([6, 3, 4], teacher_index=2)
    assert _pairs([4, 3, 2], teacher_index=2) == []                         # no positive reaches 5
    assert _pairs([4, 3, 2], teacher_index=2, large_margin=False) == [
        (0, 1, "student>student"), (0, 2, "student>teacher"), (1, 2, "student>teacher")]
    assert _pairs([6, 2], texts=["7", "7"]) == []                           # identical replies
    assert _pairs([6, 2], ended=[False, True]) == [] and _pairs([2, 6], ended=[True, False]) == []


@pytest.mark.task_06
def test_task_06_pairs_equal_the_librarys_on_random_candidates():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        scores = [rng.randint(0, 6) for _ in range(n)]
        kwargs = dict(teacher_index=rng.choice([None, n - 1]), large_margin=rng.random() < 0.7,
                      positive_min=rng.choice([4, 5]), teacher_margin=rng.choice([1, 2, 3]),
                      student_margin=rng.choice([1, 2]),
                      texts=rng.choice([None, [rng.choice("abcd") for _ in range(n)]]),
                      ended=rng.choice([None, [rng.random() < 0.8 for _ in range(n)]]))
        assert _pairs(scores, **kwargs) == sorted(select_pairs(scores, **kwargs)), (scores, kwargs)


# The checks have teeth: always run

def _checks(task: str) -> list:
    found = [f for name, f in sorted(globals().items()) if name.startswith(f"test_{task}_")]
    assert found, f"no checks for {task}"
    return found


def _is_stub(task: str) -> bool:
    """True if the task's function body is still just a docstring and `raise NotImplementedError`."""
    file, name, _ = TASKS[task]
    tree = ast.parse((TASK_DIR / f"{file}.py").read_text())
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    raised = body[0].exc if len(body) == 1 and isinstance(body[0], ast.Raise) else None
    target = raised.func if isinstance(raised, ast.Call) else raised
    return isinstance(target, ast.Name) and target.id == "NotImplementedError"


def _failures(task: str) -> list[BaseException]:
    """Run every check of `task` on whatever its function is now; collect the failures."""
    failed = []
    for check in _checks(task):
        try:
            check()
        except (AssertionError, NotImplementedError, pytest.fail.Exception) as e:
            failed.append(e)
    return failed


def _by_lesson(tasks):
    return [pytest.param(task, marks=getattr(pytest.mark, LESSON_OF[task])) for task in tasks]


@pytest.mark.parametrize("task", _by_lesson(TASKS))
def test_every_stub_as_shipped_fails_its_checks_with_not_implemented_error(task, monkeypatch):
    if not _is_stub(task):   # a student wrote it: put a stub body back for this test (pytest -m task_NN checks theirs)
        def stub(*args, **kwargs):
            raise NotImplementedError
        monkeypatch.setattr(_module(task), TASKS[task][1], stub)
    failures = _failures(task)
    assert len(failures) == len(_checks(task))
    assert all(isinstance(e, NotImplementedError) for e in failures)


@pytest.mark.parametrize("task", _by_lesson(TASKS))
def test_every_task_passes_its_checks_with_the_librarys_own_function(task, monkeypatch):
    _, name, reference = TASKS[task]
    monkeypatch.setattr(_module(task), name, reference)
    assert _failures(task) == []


def _interleaved_rope(x, cos, sin):
    """GPT-J's pairs (x0, x1), (x2, x3), ... instead of the two halves."""
    d = x.shape[-1]
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., : d // 2], sin[..., : d // 2]
    return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2).to(x.dtype)


def _pairs_once_per_chunk(chunks):
    """Forgets the chunk's count: every chunk weighs 1."""
    return count_pairs({chunk: 1 for chunk in chunks})


def _softmax_without_rescaling(x, block=4):
    """Streams the max but never rescales the old sum when the max grows."""
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype)
    total = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for j in range(0, x.shape[-1], block):
        m = torch.maximum(m, x[..., j:j + block].amax(-1))
        total = total + torch.exp(x[..., j:j + block] - m[..., None]).sum(-1)
    return torch.exp(x - m[..., None]) / total[..., None]


def _dpo_with_a_live_reference(pi_c, pi_r, ref_c, ref_r, beta=0.1):
    """Forgets to detach the reference: its gradient flows."""
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    _, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    return -F.logsigmoid(margin).mean(), metrics


def _gae_ignoring_the_mask(rewards, values, mask, gamma=1.0, lam=0.95):
    """Treats the prompt and the padding as steps of the episode."""
    return gae(rewards, values, torch.ones_like(rewards), gamma, lam)


def _pairs_with_one_margin(scores, teacher_index=None, positive_min=5, teacher_margin=2, student_margin=1,
                           large_margin=True, texts=None, ended=None):
    """Asks the teacher for the students' margin."""
    return select_pairs(scores, teacher_index, positive_min, student_margin, student_margin, large_margin,
                        texts, ended)


MISTAKES = {"task_01": _interleaved_rope, "task_02": _pairs_once_per_chunk, "task_03": _softmax_without_rescaling,
            "task_04": _dpo_with_a_live_reference, "task_05": _gae_ignoring_the_mask,
            "task_06": _pairs_with_one_margin}


@pytest.mark.parametrize("task", _by_lesson(TASKS))
def test_every_task_catches_a_classic_mistake(task, monkeypatch):
    monkeypatch.setattr(_module(task), TASKS[task][1], MISTAKES[task])
    failures = _failures(task)
    assert failures and all(isinstance(e, (AssertionError, pytest.fail.Exception)) for e in failures)
