"""Nothing lost, nothing silently wrong: saves caught between renames, a reader beside a live writer,
weight files others can read, ids the tokenizer lacks, shards from another tokenizer, a copied run.

    pytest -m lesson_03 tests/test_nothing_lost.py -q
"""

import json
import os
import shutil
import threading
import time

import pytest
import torch
from conftest import tiny_config

from minilm import MinilmError
from minilm.checkpoint import has_train_state, load_checkpoint, read_config, save_checkpoint
from minilm.data import TokenDataset
from minilm.generate import generate, sample_next
from minilm.model import Phi3
from minilm.tokenizer import Tokenizer
from minilm.weights import recover, write_weights

pytestmark = pytest.mark.lesson_03


def _checkpoint(path, tokenizer=None):
    return save_checkpoint(path, Phi3(tiny_config()), tokenizer, {"step": 3, "optimizer": {}})


def test_weight_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_weights({"w": torch.zeros(2)}, tmp_path)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == "0o644"   # safetensors alone: 0600


def test_a_save_killed_between_its_renames_is_resumed_not_restarted(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint")
    ckpt.rename(tmp_path / ".checkpoint.old-999999999")      # the writer died here (no such pid)
    assert has_train_state(tmp_path / "checkpoint")           # put back first, then found
    assert (tmp_path / "checkpoint" / "train_state.pt").exists()


def test_a_reader_waits_for_a_live_writer_between_its_renames(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint")
    writer = os.getppid()                                      # alive: stands for the saving process
    old = tmp_path / f".checkpoint.old-{writer}"
    ckpt.rename(old)
    new = tmp_path / ".checkpoint.tmp"
    _checkpoint(new)
    threading.Timer(0.2, lambda: new.rename(ckpt)).start()     # the writer's second rename, a moment later
    t0 = time.time()
    recover(ckpt)
    assert time.time() - t0 >= 0.15 and old.exists()           # waited, and did not put the old one back
    assert read_config(ckpt)["format"]


def test_ids_past_the_tokenizer_are_never_sampled():
    logits = torch.zeros(4, 10)
    logits[:, 8:] = 5.0                                        # the model prefers ids the tokenizer lacks
    greedy, _ = sample_next(logits, temperature=0, vocab_limit=8)
    sampled, lp = sample_next(logits, temperature=1.0, vocab_limit=8, generator=torch.Generator().manual_seed(0))
    assert (greedy < 8).all() and (sampled < 8).all()
    # the recorded log-probs stay those of the untruncated distribution (what PPO recomputes)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, sampled[:, None]).squeeze(-1))


def test_a_checkpoint_wider_than_its_tokenizer_generates_only_decodable_ids(tmp_path):
    tok = Tokenizer.train(["the cat sat on the mat, and the dog ran to the barn " * 20], vocab_size=270,
                          progress=False)
    torch.manual_seed(0)
    model = Phi3(tiny_config(vocab_size=320))
    with torch.no_grad():
        model.lm_head.weight[270:] += 3.0                      # push probability onto ids 270..319
    save_checkpoint(tmp_path / "ck", model, tok)
    ck = load_checkpoint(tmp_path / "ck")
    out = generate(ck.model, [tok.encode("the cat")], max_new_tokens=20, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert max(out.responses()[0]) < tok.n_vocab
    tok.decode(out.responses()[0])                             # decodes: no "cannot decode" mid-chat


def test_shards_written_by_another_tokenizer_are_refused(data_dir, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    Tokenizer.train(["something else entirely, with other words in it " * 30], vocab_size=270, progress=False).save(bad)
    with pytest.raises(MinilmError, match="written by tokenizer .* but its tokenizer files are"):
        TokenDataset(bad, "train").check_tokenizer(Tokenizer.load(bad))
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(MinilmError, match="meta.json is corrupt"):
        TokenDataset(bad, "train")


def test_a_copied_speedrun_reads_its_own_checkpoints(tmp_path):
    from minilm.speedrun import stages as table
    run = table.Run(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path / "a")))
    _checkpoint(run.dir("sft") / "checkpoint")
    record = {"checkpoint": os.path.relpath(run.dir("sft") / "checkpoint", run.root)}
    (run.dir("sft") / "stage.json").write_text(json.dumps(record))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")                               # the original is gone
    copy = table.Run(table.SpeedrunConfig(preset="ci", out_dir=str(tmp_path / "b")))
    assert copy.checkpoint("sft") == str(tmp_path / "b" / "sft" / "checkpoint")
    assert record["checkpoint"] == "sft/checkpoint"


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from minilm.run_dir import LOCK, writer_lock
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        with pytest.raises(MinilmError, match=f"being written by another run \\(pid {holder.pid}"):
            with writer_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / LOCK).write_text('{"pid": ')                   # a writer that died while writing it
    with writer_lock(tmp_path):                                # its writer is gone: taken over
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with writer_lock(tmp_path):                            # nested in one process: fine
            pass
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()                      # released when the run ends


def test_two_sft_runs_into_one_folder_the_second_stops_with_one_message(tmp_path):
    from minilm.stages.sft import run_sft, sft_config
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                        "since": "now"}))   # a live process holds it
    with pytest.raises(MinilmError, match="being written by another run"):
        run_sft(sft_config("ci", init=str(tmp_path / "none"), out_dir=str(tmp_path / "sft")))


def test_a_truncated_train_state_is_one_clear_error(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint")
    data = (ckpt / "train_state.pt").read_bytes()
    (ckpt / "train_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinilmError, match="train_state.pt is truncated or corrupt"):
        load_checkpoint(ckpt, with_train_state=True)


def test_an_out_dir_that_cannot_be_written_is_one_line_before_any_step(tmp_path, data_dir, capsys):
    """An OSError (here a folder path through a file; a read-only or full disk alike) is exit 2."""
    from minilm.cli import main
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert main(["train", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "blocker" / "run"),
                 "--max-steps", "2", "--no-samples"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not a directory" in err[0]


def test_chat_survives_bytes_that_are_not_utf8(tmp_path):
    import io

    from minilm.chat_cli import run_chat
    tok = Tokenizer.train(["the cat sat on the mat, and the dog ran to the barn " * 20], vocab_size=270,
                          progress=False)
    save_checkpoint(tmp_path / "ck", Phi3(tiny_config(vocab_size=270)), tok)
    stdin = io.TextIOWrapper(io.BytesIO(b"hi \xff there\nhello\n"), encoding="utf-8")   # strict by default
    out = io.StringIO()
    turns = run_chat(tmp_path / "ck", stdin=stdin, stdout=out, stderr=io.StringIO(), max_new_tokens=4)
    assert len(turns) == 2 and "not UTF-8 were replaced" in out.getvalue()


def test_a_killed_only_rerun_resumes_and_keeps_the_finished_original(tmp_path):
    from minilm.speedrun.run import _set_aside
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "stage.json").write_text("{}")                      # the finished original
    _set_aside(sft)                                            # --only sft: set it aside, start anew
    assert (tmp_path / "sft.prev" / "stage.json").exists() and not sft.exists()
    sft.mkdir()
    (sft / "partial").write_text("the --only run, killed mid-way")
    _set_aside(sft)                                            # the same command again
    assert (sft / "partial").exists()                          # resumed, not thrown away
    assert (tmp_path / "sft.prev" / "stage.json").exists()     # the original is still kept
