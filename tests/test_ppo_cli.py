"""run_ppo resumes exactly after a crash; `minilm ppo` and `minilm hydra-sft` end to end (lesson 08)."""

import json

import pytest
import torch
from test_ppo import reward_checkpoint  # noqa: F401
from test_reward import base_checkpoint  # noqa: F401

from minilm.checkpoint import load_checkpoint
from minilm.cli import main
from minilm.stages.ppo import ppo_config, run_ppo

pytestmark = pytest.mark.lesson_08

SMALL = dict(max_steps=4, batch_size=4, minibatch_size=2, max_new_tokens=6, n_prompts=40, n_eval=4,
             eval_every=2, ckpt_every=2, device="cpu", lora_r=4, sources="arithmetic,units", lr=1e-2)


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "sec_per_sample"} for r in rows]   # timings differ


@pytest.mark.parametrize("variant", ["hydra", "lora"])
def test_run_ppo_resumes_bit_identically(base_checkpoint, reward_checkpoint, tmp_path, variant):  # noqa: F811
    init = reward_checkpoint if variant == "hydra" else base_checkpoint
    cfg = lambda out: ppo_config("tiny", variant=variant, init=str(init), reward_init=str(reward_checkpoint),  # noqa: E731
                                 out_dir=str(tmp_path / out), **SMALL)
    whole = run_ppo(cfg("a"))

    def crash(step, row):
        if step == 3:             # after the step-2 checkpoint, before the step-4 one
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_ppo(cfg("b"), on_step=crash)
    assert load_checkpoint(tmp_path / "b" / "checkpoint").meta["step"] == 2
    resumed = run_ppo(cfg("b"))
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert resumed["before"] == whole["before"] and resumed["after"] == whole["after"]
    a = torch.load(tmp_path / "a" / "checkpoint" / "train_state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint" / "train_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and set(a["trainable"]) == set(b["trainable"])
    for name, tensor in a["trainable"].items():
        assert torch.equal(tensor, b["trainable"][name]), name
    assert run_ppo(cfg("b"))["after"] == whole["after"]       # already finished: the same summary


def test_cli_ppo_and_hydra_sft_end_to_end(base_checkpoint, reward_checkpoint, tmp_path, capsys):  # noqa: F811
    rc = main(["hydra-sft", "--init", str(base_checkpoint), "--out-dir", str(tmp_path / "hsft"),
               "--max-steps", "2", "--batch-size", "4", "--sft-batch-size", "4", "--n-pairs", "40",
               "--n-eval-pairs", "20", "--n-train", "20", "--n-eval", "2", "--max-len", "64",
               "--max-new-tokens", "4", "--eval-every", "2", "--ckpt-every", "2", "--device", "cpu"])
    assert rc in (0, None) and "eval_accuracy" in capsys.readouterr().out
    rc = main(["ppo", "--variant", "jhydra", "--init", str(tmp_path / "hsft" / "checkpoint"),
               "--out-dir", str(tmp_path / "ppo"), "--max-steps", "1", "--batch-size", "2",
               "--minibatch-size", "2", "--max-new-tokens", "4", "--n-prompts", "20", "--n-eval", "2",
               "--lora-r", "2", "--sources", "arithmetic", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc in (0, None) and "PPO (jhydra)" in out and "s/sample" in out
    ck = load_checkpoint(tmp_path / "ppo" / "checkpoint")
    assert ck.meta["variant"] == "jhydra" and set(ck.extra["heads"]) >= {"reward.weight", "value.weight"}
    # a clear error (an --out-dir of its own: the default runs/ppo-tiny may hold a student's run)
    assert main(["ppo", "--variant", "lora", "--init", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "p")]) == 2


def test_a_hydra_ppo_checkpoint_loads_as_the_policy_alone(base_checkpoint, reward_checkpoint, tmp_path):  # noqa: F811
    """Actor and critic adapters share one trunk; whoever loads the checkpoint (eval, chat, the next
    stage) must get base + actor, never the critic's adapter folded in as well."""
    from minilm.eval.suite import load_for_eval
    from minilm.lora import active_adapters, use_adapters
    run_ppo(ppo_config("tiny", variant="hydra", init=str(reward_checkpoint), reward_init=str(reward_checkpoint),
                       out_dir=str(tmp_path / "hydra"), **{**SMALL, "max_steps": 2}))
    path = tmp_path / "hydra" / "checkpoint"
    ck = load_checkpoint(path)
    assert active_adapters(ck.model) == ["actor"]
    tokens = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad(), use_adapters(ck.model, "actor"):
        actor = ck.model(tokens)[0]
    merged, _ = load_for_eval(path)                 # what the evaluation suite scores
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens)[0], actor, atol=1e-5, rtol=0)
