"""Checkpoints: exact round trips, atomic replacement, and a clear MinilmError for every broken input.

    pytest -m lesson_03 tests/test_checkpoint.py -q
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config

from minilm import MinilmError, checkpoint
from minilm.checkpoint import load_checkpoint, save_checkpoint
from minilm.model import Phi3
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_03

TEXT = """A checkpoint is a directory. It is written under a temporary name and renamed into place,
so a crash at any instant leaves either the previous complete checkpoint or the new one. Loading
checks every parameter name and shape and says exactly what does not match."""


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], vocab_size=280, progress=False)


def _weights_file(directory):
    return next(p for p in (directory / "model.safetensors", directory / "model.pt") if p.exists())


def _rewrite_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _train_state(model):
    """A real AdamW state after one step (moments are tensors), plus a step count and RNG state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 320, (2, 8)), torch.randint(0, 320, (2, 8)))[1].backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "step": 7, "rng": torch.get_rng_state()}


@pytest.fixture(scope="module")
def original(tmp_path_factory, tokenizer):
    """One untied checkpoint with tokenizer and train state, saved once: (path, model, train_state)."""
    model = Phi3(tiny_config(tie_embeddings=False))
    state = _train_state(model)
    path = save_checkpoint(tmp_path_factory.mktemp("original") / "ck", model, tokenizer, state,
                           meta={"stage": "test", "step": 7})
    return path, model, state


@pytest.fixture
def saved(original, tmp_path):
    """A fresh copy of `original` that a test may break."""
    path, model, state = original
    return shutil.copytree(path, tmp_path / "ck"), model, state


def test_round_trip_is_exact(saved, tokenizer):
    path, model, state = saved
    ck = load_checkpoint(path, with_train_state=True)
    assert ck.config == model.config
    assert ck.meta == {"stage": "test", "step": 7}
    assert ck.tokenizer.fingerprint() == tokenizer.fingerprint()
    assert ck.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    original, loaded = model.state_dict(), ck.model.state_dict()
    assert original.keys() == loaded.keys()
    for name in original:
        assert torch.equal(original[name], loaded[name]), name  # bit-equal, not just close
    assert ck.train_state["step"] == 7
    assert torch.equal(ck.train_state["rng"], state["rng"])
    for pid, moments in state["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(ck.train_state["optimizer"]["state"][pid][key], value)
    assert load_checkpoint(path).train_state is None  # only loaded when asked for


def test_tied_embeddings_stored_once_and_tied_after_load(tmp_path):
    model = Phi3(tiny_config(tie_embeddings=True))
    path = save_checkpoint(tmp_path / "ck", model)
    if path.joinpath("model.safetensors").exists():
        from safetensors.torch import load_file
        names = load_file(str(path / "model.safetensors")).keys()
    else:
        names = torch.load(path / "model.pt").keys()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    ck = load_checkpoint(path)
    assert ck.tokenizer is None
    assert ck.model.lm_head.weight is ck.model.model.embed_tokens.weight
    idx = torch.randint(0, 320, (2, 10))
    assert torch.equal(ck.model(idx)[0], model(idx)[0])


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    """A write that dies half-way must not touch the checkpoint already on disk."""
    path, model, _ = saved
    before = sorted(p.name for p in path.iterdir())

    def broken_writer(sd, directory, stem="model"):
        (directory / f"{stem}.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_weights", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Phi3(tiny_config(tie_embeddings=False, n_layer=1)))
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    ck = load_checkpoint(path)  # still the previous, complete checkpoint
    assert ck.config.n_layer == 2
    assert torch.equal(ck.model.lm_head.weight, model.lm_head.weight)
    # the next successful save replaces it and leaves nothing else beside it
    save_checkpoint(path, Phi3(tiny_config(n_layer=1)))
    assert load_checkpoint(path).config.n_layer == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# ---- every broken input gives a MinilmError that says what is wrong -------------------------------

def _remove(path):
    path.unlink()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


BROKEN = {  # name -> (how to break a good checkpoint, words the error must contain)
    "missing config.json": (lambda d: _remove(d / "config.json"), "no config.json"),
    "corrupt config.json": (lambda d: (d / "config.json").write_text('{"format": "minil'), "corrupt"),
    "empty config.json": (lambda d: (d / "config.json").write_text(""), "corrupt"),
    "config.json not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), "corrupt"),
    "wrong format": (lambda d: _rewrite_config(d, lambda c: c.update(format="hf")), "not a minilm checkpoint"),
    "invalid model config": (lambda d: _rewrite_config(d, lambda c: c["model"].update(n_head=3)),
                             "invalid model config"),
    "missing weights": (lambda d: _remove(_weights_file(d)), "no weights"),
    "truncated weights": (lambda d: _truncate(_weights_file(d)), "corrupt"),
    "garbage weights": (lambda d: _weights_file(d).write_bytes(b"\x00" * 100), "corrupt"),
    "shape mismatch": (lambda d: _rewrite_config(d, lambda c: c["model"].update(d_ff=128)),
                       "model.layers.0.mlp.gate_up_proj.weight"),
    "missing tokenizer file": (lambda d: _remove(d / "tokenizer.tiktoken"), "tokenizer.tiktoken not found"),
    "tokenizer fingerprint": (lambda d: Tokenizer.train([TEXT[::-1]], 280, progress=False).save(d),
                              "fingerprint"),
    "tokenizer larger than model vocab": (lambda d: _rewrite_config(d, lambda c: c["model"].update(vocab_size=256)),
                                          "280 tokens but the model's vocab_size is 256"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_gives_clear_error(case, saved):
    path = saved[0]
    breaks, words = BROKEN[case]
    breaks(path)
    with pytest.raises(MinilmError) as e:
        load_checkpoint(path)
    assert words in str(e.value)
    assert str(path) in str(e.value)  # says which checkpoint


def test_missing_directory(tmp_path):
    with pytest.raises(MinilmError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_shape_mismatch_names_every_parameter(tmp_path):
    save_checkpoint(tmp_path / "ck", Phi3(tiny_config(vocab_size=320)))
    _rewrite_config(tmp_path / "ck", lambda c: c["model"].update(vocab_size=384))
    with pytest.raises(MinilmError) as e:
        load_checkpoint(tmp_path / "ck")
    assert "model.embed_tokens.weight" in str(e.value)
    assert "(320, 64)" in str(e.value) and "(384, 64)" in str(e.value)


def test_save_killed_between_renames_is_recovered(tmp_path):
    """If a save dies after moving the old checkpoint aside, the next load puts it back."""
    model = Phi3(tiny_config())
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    ckpt.rename(tmp_path / ".ckpt.old-12345")  # the state between atomic_dir's two renames
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)
    assert not list(tmp_path.glob(".ckpt.*"))


def test_import_keeps_the_full_context_and_the_sliding_window():
    from minilm.checkpoint import config_from_hf, hf_config
    hf = {**hf_config(tiny_config(max_seq_len=64)), "sliding_window": 32}
    cfg = config_from_hf(hf)
    assert (cfg.max_seq_len, cfg.sliding_window) == (64, 32)   # tests/test_long_context.py: HF parity
