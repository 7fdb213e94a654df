"""Shared fixtures: a small prepared data set and a tiny model config, built once per session."""

import itertools

import pytest
import torch

from minilm.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough that a forward/backward pass takes milliseconds."""
    fields = dict(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                  max_seq_len=64, tie_embeddings=True)
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """~150 KB of stdlib docstrings, a 320-token BPE, train/val shards (takes a few seconds)."""
    from data_prep.prepare import prepare_data
    from data_prep.stdlib_docs import stdlib_documents

    docs = list(itertools.islice(stdlib_documents(), 60))
    return prepare_data(tmp_path_factory.mktemp("data"), vocab_size=320, documents=docs,
                        val_fraction=0.2, progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _deselect(config, items, unwanted) -> None:
    dropped = [item for item in items if unwanted(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not unwanted(item)]


def pytest_collection_modifyitems(config, items):
    """Two kinds of tests run only when -m names them.

    - Implement-it tasks (tests/test_tasks.py): `pytest -m task_01`. The shipped task files are
      stubs, so any other run deselects their checks.
    - `slow` tests: pytest.ini's `-m "not slow and not gpu"` skips them, but a lesson's own
      `-m lesson_12` replaces that expression, and would start the 20-minute speedrun test.
      `pytest -m slow` or `-m "lesson_12 and slow"` runs them. (`gpu` tests skip themselves
      without a GPU, so `-m lesson_04` runs them on a GPU machine.)
    """
    expr = config.getoption("markexpr") or ""
    if "task_" not in expr:
        _deselect(config, items, lambda item: any(m.name.startswith("task_") for m in item.iter_markers()))
    if "slow" not in expr:
        _deselect(config, items, lambda item: item.get_closest_marker("slow") is not None)
