"""The command line: user errors exit with status 2 and one message; train -> generate -> HF round trip.

Most checks call `minilm.cli.main([...])` in-process (no second torch import); two run
`python -m minilm` in a subprocess to check the real entry point and that no traceback escapes.

    pytest -m lesson_03 tests/test_cli.py -q
"""

import shutil
import subprocess
import sys

import pytest
import torch

from minilm.checkpoint import load_checkpoint
from minilm.cli import main
from minilm.config import PRESETS

pytestmark = pytest.mark.lesson_03

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--d-ff", "64",
        "--max-seq-len", "32", "--vocab-size", "320", "--batch-size", "4", "--device", "cpu"]


def run_cli(*args):
    """`python -m minilm ARGS` in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "minilm", *map(str, args)], capture_output=True,
                       text=True, timeout=120, check=False)
    return p.returncode, p.stdout, p.stderr


def assert_user_error(capsys, argv, words):
    """main(argv) exits with 2 and prints one error line containing `words`, no traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (unknown choice, missing argument)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert words in err, err


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A 6-step tiny model trained through the CLI on the shared data set: its checkpoint path."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data-dir", str(data_dir), "--out-dir", str(out), *TINY,
                 "--max-steps", "6", "--eval-every", "3", "--eval-batches", "2", "--no-samples"]) == 0
    return out / "checkpoint"


def test_subprocess_bad_checkpoint_exits_2_without_traceback(tmp_path):
    code, _, err = run_cli("generate", tmp_path / "missing", "--prompt", "hi")
    assert code == 2
    assert "Traceback" not in err
    [message] = [line for line in err.splitlines() if "error:" in line]
    assert message.startswith(f"minilm generate: error: {tmp_path / 'missing'} is not a minilm checkpoint")
    assert "does not exist" in message


def test_subprocess_presets_lists_every_preset():
    code, out, _ = run_cli("presets")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(PRESETS)
    assert "3,821,079,552" in out


@pytest.mark.parametrize("command", [["generate", "{missing}", "--prompt", "hi"],
                                     ["export-hf", "{missing}", "{tmp}/hf"],
                                     ["import-hf", "{missing}", "{tmp}/ck"]])
def test_nonexistent_input(command, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in command]
    assert_user_error(capsys, argv, str(tmp_path / "missing"))


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    broken = shutil.copytree(trained, tmp_path / "ck")
    weights = next(broken.glob("model.*"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(capsys, ["generate", broken, "--prompt", "hi"], "corrupt")
    (broken / "config.json").write_text("{")
    assert_user_error(capsys, ["export-hf", broken, tmp_path / "hf"], "corrupt")


def test_unknown_preset(capsys):
    assert_user_error(capsys, ["train", "--preset", "huge"], "invalid choice: 'huge'")


def test_vocab_mismatch_between_data_and_model(data_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY, "--vocab-size", "256"]
    assert_user_error(capsys, argv, "uses 320 tokens but the model's vocab_size is 256")


def test_bad_model_field(data_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY, "--d-model", "64",
            "--n-head", "3"]
    assert_user_error(capsys, argv, "d_model=64 is not divisible by n_head=3")


def test_train_writes_checkpoint(trained):
    ck = load_checkpoint(trained, with_train_state=True)
    assert ck.meta == {"stage": "pretrain", "step": 6}
    assert ck.train_state["step"] == 6
    assert (ck.config.n_layer, ck.config.d_model, ck.config.n_kv_head) == (1, 32, 1)
    assert ck.tokenizer.n_vocab == 320
    metrics = (trained.parent / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "val_loss" in m]) == 2  # evaluated at steps 3 and 6


def test_generate_prints_text(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hi") and len(out.strip()) > 2


def test_export_then_import_hf_round_trip(trained, tmp_path, capsys):
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export-hf", str(trained), str(hf_dir)]) == 0
    assert (hf_dir / "config.json").exists()
    assert main(["import-hf", str(hf_dir), str(back), "--tokenizer", str(trained)]) == 0
    a, b = load_checkpoint(trained), load_checkpoint(back)
    assert a.config == b.config
    assert b.tokenizer.fingerprint() == a.tokenizer.fingerprint()
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    capsys.readouterr()
    outputs = []
    for ck in (trained, back):  # same weights, same seed: the same sampled text
        assert main(["generate", str(ck), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
