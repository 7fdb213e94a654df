"""The evaluation suite (minilm/eval/suite.py): known answers from planted models, invariances
(a model against itself wins exactly half), bpb equal to the training loop's, determinism, and
checkpoints (LoRA merged) equal to the model in memory."""

import copy
import json

import pytest
import torch
from conftest import tiny_config

import minilm.eval.suite as suite
from minilm.eval.ladder import ladder_items
from minilm import MinilmError
from minilm.checkpoint import save_checkpoint
from minilm.config import build
from minilm.generate import Rollout
from minilm.lora import apply_lora, merge_and_unload
from minilm.model import Phi3
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_12


def small_cfg(**kw) -> suite.SuiteConfig:
    fields = dict(n_ladder=2, n_bpb_batches=2, n_math=4, n_chat=8, n_winrate=8, n_env=0, max_new_tokens=8,
                  math_new_tokens=8, ladder_new_tokens=8, batch_size=4, device="cpu")
    return suite.SuiteConfig(**{**fields, **kw})


def model(seed: int = 0, **cfg) -> Phi3:
    """A random model; untied, so its greedy replies are varied text (a tied one echoes "\\n")."""
    torch.manual_seed(seed)
    return Phi3(tiny_config(**{"tie_embeddings": False, **cfg})).eval()


@pytest.fixture(scope="module")
def tok(data_dir):
    return Tokenizer.load(data_dir)


def test_keys_and_a_model_against_itself_wins_exactly_half(tok, data_dir, monkeypatch):
    calls = []
    original = suite.greedy_judgements
    monkeypatch.setattr(suite, "greedy_judgements", lambda m, *a: calls.append(m) or original(m, *a))
    m, cache = model(), {}
    row = suite.evaluate_model(m, tok, small_cfg(n_math=0), data_dir, reference=copy.deepcopy(m), cache=cache)
    assert tuple(row) == (*suite.METRICS, "ladder_correct")
    assert len(row["ladder_correct"]) == 2 * 6 and set(row["ladder_correct"]) <= {0, 1}   # 2 per rung
    assert row["winrate"] == 0.5 and row["winrate_lo"] < 0.5 < row["winrate_hi"]
    # sampled: both draw from one seeded generator, so a model against itself ties every prompt too
    assert row["winrate_sampled"] == 0.5 and row["winrate_sampled_lo"] < 0.5 < row["winrate_sampled_hi"]
    assert row["env_success"] is None and row["math_acc"] is None       # counts of 0 skip a metric
    assert len(calls) == 3 and len(cache) == 2                          # the model (ladder, chat), the reference
    greedy, sampled = cache.values()
    assert len(greedy) == 8 and sum(map(bool, greedy)) >= 6 and len(set(greedy)) > 1  # varied, mostly non-empty
    assert len(sampled) == 8 and sampled != greedy                      # T = 0.7 draws other replies
    again = suite.evaluate_model(m, tok, small_cfg(n_math=0), data_dir, reference=m, cache=cache)
    assert again == row and len(calls) == 5                             # the reference's replies came from the cache
    alone = suite.evaluate_model(m, tok, small_cfg(n_math=0), data_dir)    # no reference: no win-rate,
    no_winrates = {k: None for k in row if k.startswith("winrate")}
    assert alone == {**row, **no_winrates}                               # the rest unchanged


def test_bpb_is_what_the_training_loop_reports(tok, data_dir):
    from minilm.data import TokenDataset
    from minilm.runtime import Runtime
    from minilm.stages.pretrain import TrainConfig, evaluate
    m = model()
    row = suite.evaluate_model(m, tok, small_cfg(n_bpb_batches=3, n_math=0, n_chat=0), data_dir)
    want = evaluate(m, TokenDataset(data_dir, "val"), build(TrainConfig, eval_batches=3, batch_size=4, seq_len=64),
                    Runtime(torch.device("cpu"), None))
    assert (row["bpb"], row["loss"]) == (want["val_bpb"], want["val_loss"])
    assert row["loss"] == pytest.approx(torch.log(torch.tensor(320.0)).item(), abs=0.5)  # untrained: ~uniform


def planted_generate(tok, cfg, perfect):
    """A stand-in for minilm.generate.generate: `perfect` replies each prompt's reference reply
    (the worked solution for word problems), any other model replies nothing (<|endoftext|>)."""
    convs = suite.math_problems(cfg.n_math, cfg.seed) + suite.chat_conversations(
        max(cfg.n_chat, cfg.n_winrate), cfg.seed, cfg.sources) + ladder_items(cfg.n_ladder, cfg.seed)
    replies = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in convs}
    end = tok.special_id("<|end|>")

    def generate(m, prompts, max_new_tokens, temperature=1.0, stop_tokens=(), pad_id=0, **kw):
        questions = [tok.decode(p).split("<|user|>\n")[-1].split("<|end|>")[0] for p in prompts]
        rows = [tok.encode(replies[q]) + [end] if m is perfect else [tok.eot_id] for q in questions]
        tokens = torch.full((len(rows), max(map(len, rows))), pad_id)
        gen_mask = torch.zeros_like(tokens)
        for i, r in enumerate(rows):
            tokens[i, :len(r)], gen_mask[i, :len(r)] = torch.tensor(r), 1
        return Rollout(tokens, gen_mask.clone(), gen_mask, torch.zeros(tokens.shape), 0)
    return generate


def test_a_planted_perfect_answerer_scores_one_and_a_silent_model_zero(tok, data_dir, monkeypatch):
    cfg = small_cfg(n_bpb_batches=0, max_new_tokens=32, math_new_tokens=32, ladder_new_tokens=32)
    perfect, silent = model(max_seq_len=1024), model(1, max_seq_len=1024)
    monkeypatch.setattr("minilm.post.sft.generate", planted_generate(tok, cfg, perfect))
    best = suite.evaluate_model(perfect, tok, cfg, data_dir, reference=silent)
    rates = ("ladder_acc", "ladder_acc_mid", "ladder_ops1", "ladder_word", "math_acc", "end_rate", "form_rate",
             "correct", "winrate")
    assert [best[k] for k in rates] == [1.0] * len(rates)
    worst = suite.evaluate_model(silent, tok, cfg, data_dir, reference=perfect)
    assert [worst[k] for k in rates] == [0.0] * len(rates)
    # a context too short for the word problems: those prompts are not asked and count as failures
    short = model(max_seq_len=64)
    monkeypatch.setattr("minilm.post.sft.generate", planted_generate(tok, cfg, short))
    assert suite.evaluate_model(short, tok, cfg, data_dir)["math_acc"] == 0.0


def test_a_base_model_evaluates_and_the_same_model_gives_the_same_dict(tok, data_dir):
    cfg = small_cfg(n_env=4)
    m, ref = model(), model(1)
    first = suite.evaluate_model(m, tok, cfg, data_dir, reference=ref)
    assert first == suite.evaluate_model(m, tok, cfg, data_dir, reference=ref, cache={})
    scores = first.pop("ladder_correct")
    assert all(isinstance(v, float) for v in first.values()) and sum(scores) / len(scores) == first["ladder_acc"]
    assert first["env_success"] == pytest.approx(sum(first[f"env_success_{e}"] for e in suite.ENV_NAMES) / 3)
    assert all(0.0 <= first[k] <= 1.0 for k in suite.METRICS if k not in ("bpb", "loss"))
    json.dumps(first)                                                   # JSON-safe
    assert not m.training


def test_a_lora_checkpoint_is_evaluated_merged(tok, data_dir, tmp_path):
    m = model()
    apply_lora(m, r=4)
    with torch.no_grad():                   # B = 0 at init would make the adapter a no-op
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_checkpoint(tmp_path / "ck", m, tok, meta={"stage": "sft"})
    cfg = small_cfg(n_math=2, n_chat=4, n_winrate=0)
    merged = merge_and_unload(copy.deepcopy(m)).eval()
    row = suite.evaluate_checkpoint(tmp_path / "ck", cfg, data_dir)
    assert row == suite.evaluate_model(merged, tok, cfg, data_dir)
    assert row["bpb"] != suite.evaluate_model(model(), tok, cfg, data_dir)["bpb"]   # the adapter counted


def test_bad_checkpoints_and_configs_give_clear_errors(tok, data_dir, tmp_path):
    with pytest.raises(MinilmError, match="no such checkpoint"):
        suite.evaluate_checkpoint(tmp_path / "missing", small_cfg(), data_dir)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(MinilmError, match="corrupt"):
        suite.evaluate_checkpoint(tmp_path / "broken", small_cfg(), data_dir)
    with pytest.raises(MinilmError, match="n_ladder=-2"):
        suite.evaluate_model(model(), tok, small_cfg(n_ladder=-2), data_dir)
    with pytest.raises(MinilmError, match="n_chat=-1"):
        suite.evaluate_model(model(), tok, small_cfg(n_chat=-1), data_dir)
