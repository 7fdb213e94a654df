"""The CLI as a careless user drives it: every bad flag value and every corrupt input file is
exit 2 and one line naming the problem, and nothing already on disk changes.

A 6-step pretraining run (checkpoint, train_state, settings) is made once; each case runs against
it, or against a copy with one file broken, through `minilm.cli.main` (the entry point of
`python -m minilm`). The folders are hashed before and after each case.

    pytest -m lesson_03 tests/test_cli_audit.py -q
"""

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from minilm.cli import main

pytestmark = pytest.mark.lesson_03

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--d-ff", "64",
        "--max-seq-len", "32", "--vocab-size", "320", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(data_dir, tmp_path_factory):
    """{DATA, RUN (a finished 6-step run into which the cases point), CKPT}: the paths cases use."""
    root = tmp_path_factory.mktemp("audit")
    run = root / "run"
    assert main(["train", "--data-dir", str(data_dir), "--out-dir", str(run), *TINY, "--eval-every", "3",
                 "--set", "eval_batches=2", "--max-steps", "6", "--no-samples"]) == 0
    return {"DATA": str(data_dir), "RUN": str(run), "CKPT": str(run / "checkpoint"), "ROOT": root}


def snapshot(*folders) -> dict[str, str]:
    """sha256 of every file under the folders: what "nothing changed" is checked against."""
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
            for folder in folders for f in sorted(Path(folder).rglob("*")) if f.is_file()}


def run_case(argv, capsys, monkeypatch, stdin="hello\n"):
    """main(argv) -> (exit code, stderr lines), with argparse's own exits caught as main's callers see them."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_clear_line(code, lines, words):
    assert code == 2, lines
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and words.lower() in errors[0].lower(), lines


# the run's own settings and more steps: a valid resume, which each case spoils in one way
RESUME = ["train", "--data-dir", "{DATA}", "--out-dir", "{RUN}", *TINY, "--eval-every", "3", "--set", "eval_batches=2",
          "--max-steps", "8", "--no-samples"]
FRESH = ["--init", "{CKPT}", "--out-dir", "{ROOT}/new", "--device", "cpu"]

# (argv, words the one error line must hold). Train cases point at the finished run: a bad value must be
# refused before the resume could write a byte into it.
BAD_FLAGS = [
    (RESUME + ["--batch-size", "0"], "batch_size must be"),
    (RESUME + ["--batch-size", "-1"], "batch_size must be"),
    (RESUME + ["--lr", "nan"], "lr must be"),
    (RESUME + ["--lr", "-1"], "lr must be"),
    (RESUME + ["--set", "ckpt_every=0"], "ckpt_every must be"),
    (RESUME + ["--eval-every", "0"], "eval_every must be"),
    (RESUME + ["--set", "log_every=0"], "log_every must be"),
    (RESUME + ["--set", "eval_batches=0"], "eval_batches must be"),
    (RESUME + ["--set", "betas=[0.9]"], "betas"),
    (RESUME + ["--set", "betas=[0.9,2.0]"], "betas must be"),
    (RESUME + ["--max-steps", "0"], "max_steps must be"),
    (RESUME + ["--max-steps", "-5"], "max_steps must be"),
    (RESUME + ["--grad-accum", "0"], "grad_accum must be"),
    (RESUME + ["--set", "grad_clip=0"], "grad_clip must be"),
    (RESUME + ["--warmup-steps", "-1"], "warmup_steps must be"),
    (RESUME + ["--set", "min_lr_ratio=1.5"], "min_lr_ratio must be"),
    (RESUME + ["--set", "max_steps=ten"], "max_steps takes int"),
    (RESUME + ["--set", "no_such_field=1"], "no_such_field"),
    (RESUME + ["--lr", "fast"], "--lr"),
    (RESUME + ["--lr", "1e-3"], "settings"),                       # a changed setting: resume refuses it
    (["generate", "{CKPT}", "--prompt", "word " * 200], "max_seq_len"),
    (["generate", "{CKPT}", "--prompt", "hi", "--max-new-tokens", "1000"], "max_seq_len"),
    (["generate", "{CKPT}", "--prompt", "hi", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "{CKPT}", "--prompt", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "{CKPT}", "--prompt", "hi", "--top-p", "-1"], "top_p"),
    (["generate", "{CKPT}", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "{CKPT}", "--prompt", "hi", "--top-k", "0"], "top_k"),
    (["chat", "{CKPT}", "--top-p", "1.5"], "top_p"),
    (["chat", "{CKPT}", "--max-new-tokens", "0"], "max_new_tokens"),
    (["sft", *FRESH, "--batch-size", "0"], "batch_size must be"),
    (["sft", *FRESH, "--lr", "nan"], "lr must be"),
    (["dpo", *FRESH, "--beta", "0"], "beta"),
    (["ppo", *FRESH, "--set", "whiten_advantages=maybe"], "takes bool"),
    (["ltc", *FRESH, "--env", "garden"], "garden"),
    (["prune", *FRESH, "--sparsity", "1.5"], "sparsity"),
    (["speedrun", "--out-dir", "{ROOT}/sr", "--set", "pretrain.lr=nan", "--dry-run"], "lr must be"),
    (["speedrun", "--out-dir", "{ROOT}/sr", "--set", "ltc.env=garden", "--dry-run"], "garden"),
    (["speedrun", "--out-dir", "{ROOT}/sr", "--only", "pretrian", "--dry-run"], "pretrian"),
]


def _fill(argv, work):
    return [a.format(**work) if isinstance(a, str) else a for a in argv]


@pytest.mark.parametrize("argv, words", BAD_FLAGS, ids=[f"{a[0]} {' '.join(a[-2:])[:30]}" for a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_line_exit_2_and_changes_nothing(work, argv, words, capsys, monkeypatch):
    before = snapshot(work["RUN"], work["DATA"])
    code, lines = run_case(_fill(argv, work), capsys, monkeypatch)
    assert_one_clear_line(code, lines, words)
    assert snapshot(work["RUN"], work["DATA"]) == before
    assert not (work["ROOT"] / "new").exists() and not (work["ROOT"] / "sr").exists()   # no empty folders


def test_a_non_json_set_value_reaches_a_text_field(work, capsys):
    """`--set ltc.env=qa` (text, not JSON) is a value, not a crash."""
    assert main(["speedrun", "--out-dir", f"{work['ROOT']}/sr", "--set", "ltc.env=qa", "--dry-run"]) == 0
    assert "env='qa'" in capsys.readouterr().out


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path):
    path.write_bytes(b"\x00\xffnot what it should be" * 7)


def _empty(path: Path):
    path.write_bytes(b"")


def _remove(path: Path):
    path.unlink()


def _into_a_folder(path: Path):
    path.unlink()
    path.mkdir()


def _edit_json(**fields):
    def edit(path: Path):
        doc = json.loads(path.read_text())
        for key, value in fields.items():
            target = doc
            *parents, last = key.split("__")
            for p in parents:
                target = target[p]
            target[last] = value
        path.write_text(json.dumps(doc))
    return edit


GENERATE = ["generate", "{CKPT}", "--prompt", "hi", "--max-new-tokens", "2"]
NEW_RUN = ["train", "--data-dir", "{DATA}", "--out-dir", "{TMP}/new", *TINY, "--max-steps", "2", "--no-samples"]
# (file to break, how, the command that reads it, words its error line holds)
CORRUPT = [
    ("checkpoint/model.safetensors", _truncate, GENERATE, "model.safetensors"),
    ("checkpoint/model.safetensors", _garbage, GENERATE, "model.safetensors"),
    ("checkpoint/model.safetensors", _empty, GENERATE, "model.safetensors"),
    ("checkpoint/model.safetensors", _remove, GENERATE, "model.safetensors"),
    ("checkpoint/model.safetensors", _into_a_folder, GENERATE, "model.safetensors"),
    ("checkpoint/config.json", _garbage, GENERATE, "config.json"),
    ("checkpoint/config.json", _truncate, GENERATE, "config.json"),
    ("checkpoint/config.json", _remove, GENERATE, "config.json"),
    ("checkpoint/config.json", _edit_json(model__n_layer="two"), GENERATE, "config"),
    ("checkpoint/config.json", _edit_json(model__d_model=64), GENERATE, "do not fit"),
    ("checkpoint/config.json", _edit_json(model__vocab_size=300), GENERATE, "vocab"),
    ("checkpoint/tokenizer.tiktoken", _garbage, GENERATE, "tokenizer"),
    ("checkpoint/tokenizer.tiktoken", _remove, GENERATE, "tokenizer"),
    ("checkpoint/tokenizer.json", _garbage, GENERATE, "tokenizer"),
    ("checkpoint/train_state.pt", _truncate, RESUME, "train_state.pt"),
    ("checkpoint/train_state.pt", _garbage, RESUME, "train_state.pt"),
    ("checkpoint/train_state.pt", _empty, RESUME, "train_state.pt"),
    ("checkpoint/train_state.pt", _remove, RESUME, "without train_state.pt"),   # a final checkpoint: not retrained over
    ("settings.json", _garbage, RESUME, "settings.json"),
    ("data/meta.json", _garbage, NEW_RUN, "meta.json"),
    ("data/meta.json", _remove, NEW_RUN, "meta.json"),
    ("data/train_000.bin", _truncate, NEW_RUN, "train_000.bin"),
    ("data/train_000.bin", _remove, NEW_RUN, "shard"),
    ("data/tokenizer.tiktoken", _garbage, NEW_RUN, "tokenizer"),
]


@pytest.mark.parametrize("name, breaks, argv, words", CORRUPT,
                         ids=[f"{n}-{b.__name__.strip('_')}" for n, b, _, _ in CORRUPT])
def test_a_corrupt_input_is_one_line_exit_2_and_changes_nothing(work, tmp_path, name, breaks, argv, words,
                                                                capsys, monkeypatch):
    """A copy of the run (or of the data) with one file broken; the command that reads it refuses it."""
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(work["RUN"], run)
    shutil.copytree(work["DATA"], data)
    breaks(tmp_path / (name if name.startswith("data/") else f"run/{name}"))
    before = snapshot(run, data)
    # a broken run resumes on the intact data it was trained on; broken data starts a new run
    paths = {"RUN": str(run), "CKPT": str(run / "checkpoint"), "TMP": str(tmp_path),
             "DATA": str(data) if name.startswith("data/") else work["DATA"]}
    code, lines = run_case(_fill(argv, paths), capsys, monkeypatch)
    assert_one_clear_line(code, lines, words)
    assert snapshot(run, data) == before
    assert not (tmp_path / "new").exists()


def test_a_speedrun_folder_with_a_corrupt_stage_record_is_one_line(tmp_path, capsys, monkeypatch):
    record = tmp_path / "run" / "data" / "stage.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"seconds": 1')                      # cut off mid-write by hand
    code, lines = run_case(["speedrun", "--preset", "ci", "--out-dir", str(tmp_path / "run")], capsys, monkeypatch)
    assert_one_clear_line(code, lines, "stage.json is corrupt")
    assert record.read_text() == '{"seconds": 1'
