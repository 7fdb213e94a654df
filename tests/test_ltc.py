"""The LTC loss and loop (minilm/agents/ltc_data.py, minilm/stages/ltc.py, lessons/10_ltc.md)."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from test_patterns import CountEnv, hydra, tok  # noqa: F401

from minilm.agents.ltc_data import LossWeights, collate_episodes, ltc_loss, monte_carlo_returns
from minilm.agents.patterns import Episode, RolloutConfig, make_pattern, run_episodes

pytestmark = pytest.mark.lesson_10


def hand_episode(who, reward, success, tokens=None):
    n = len(who)
    return Episode(tokens=tokens or list(range(1, n + 1)), who=list(who), logprobs=[-1.0 * w for w in who],
                   values=[0.1 * i for i in range(n)], reward=reward, success=success)


def test_returns_with_gamma_one_are_the_terminal_reward_on_every_agent_token():
    eps = [hand_episode([0, 0, 1, 1, 0, 0, 1, 0], -1.0, False), hand_episode([0, 1, 0, 1, 1, 0], 1.0, True)]
    batch = collate_episodes(eps, pad_id=0)
    assert batch["rewards"][0].tolist() == [0, 0, 0, 0, 0, 0, -1, 0]      # on the LAST agent token
    assert batch["rewards"][1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    g = monte_carlo_returns(batch["rewards"], batch["agent_mask"], gamma=1.0)
    assert torch.equal(g, batch["rewards"].sum(1, keepdim=True) * batch["agent_mask"])
    assert batch["lm_weight"].tolist() == pytest.approx([1e-5, 1.0])
    # gamma < 1 discounts per agent token, not per environment token in between
    g9 = monte_carlo_returns(batch["rewards"], batch["agent_mask"], gamma=0.9)
    assert g9[1].tolist() == pytest.approx([0, 0.81, 0, 0.9, 1.0, 0, 0, 0])


def loss_by_hand(logits, values, batch, w):
    """Plain loops over one row: the reference for ltc_loss."""
    tokens, agent = batch["tokens"][0].tolist(), batch["agent_mask"][0].tolist()
    logp = torch.log_softmax(logits[0].double(), -1)
    lps = [logp[t - 1, tokens[t]].item() for t in range(1, len(tokens))]
    lm = -sum(lps) / len(lps) * batch["lm_weight"][0].item()
    idx = [t for t in range(len(tokens)) if agent[t]]
    g = batch["rewards"][0].sum().item()
    adv = [g - batch["old_values"][0, t].item() for t in idx]
    mu = sum(adv) / len(adv)
    sd = math.sqrt(sum((a - mu) ** 2 for a in adv) / len(adv) + 1e-8)
    adv = [(a - mu) / sd for a in adv]
    pg = vf = ent = 0.0
    for a, t in zip(adv, idx):
        ratio = math.exp(logp[t - 1, tokens[t]].item() - batch["old_logprobs"][0, t].item())
        pg += max(-a * ratio, -a * min(max(ratio, 1 - w.clip), 1 + w.clip)) / len(idx)
        vf += 0.5 * (values[0, t - 1].item() - g) ** 2 / len(idx)
        p = logp[t - 1].exp()
        ent += -(p * logp[t - 1]).sum().item() / len(idx)
    return lm, pg, vf, ent


@pytest.mark.parametrize("lm_coef,ppo_coef", [(1.0, 0.5), (1.0, 0.0), (0.0, 0.5)])
def test_loss_combination_on_hand_built_tensors(lm_coef, ppo_coef):
    torch.manual_seed(0)
    ep = hand_episode([0, 1, 1, 0, 1, 0], 1.0, True, tokens=[3, 0, 4, 2, 1, 4])
    ep.logprobs = [0.0, -1.2, -0.3, 0.0, -2.0, 0.0]
    batch = collate_episodes([ep], pad_id=0)
    logits, values = torch.randn(1, 6, 5), torch.randn(1, 6).tanh()
    w = LossWeights(lm_coef=lm_coef, ppo_coef=ppo_coef)
    loss, m = ltc_loss(logits, values, batch, w)
    lm, pg, vf, ent = loss_by_hand(logits, values, batch, w)
    assert m["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert loss.item() == pytest.approx(lm_coef * lm + ppo_coef * (pg + vf - 0.01 * ent), abs=1e-5)
    if ppo_coef:
        assert (m["pg_loss"], m["vf_loss"], m["entropy"]) == pytest.approx((pg, vf, ent), abs=1e-5)


def test_no_policy_or_value_gradient_reaches_teacher_or_environment_tokens():
    ep = hand_episode([0, 0, 1, 1, 0, 0, 1, 0, 0], -1.0, False, tokens=[1, 2, 3, 4, 0, 1, 2, 3, 4])
    batch = collate_episodes([ep], pad_id=0)
    logits = torch.randn(1, 9, 5, requires_grad=True)
    values = torch.randn(1, 9, requires_grad=True)
    loss, _ = ltc_loss(logits, values, batch, LossWeights(lm_coef=0.0))
    loss.backward()
    # position t - 1 predicts token t: only positions before an agent token may get a gradient
    predicts_agent = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert logits.grad[~predicts_agent].abs().max() == 0 and values.grad[~predicts_agent].abs().max() == 0
    assert logits.grad[predicts_agent].abs().sum(-1).min() > 0
    # the LM loss, by contrast, reaches every token of a successful episode
    ep.success = True
    logits.grad = None
    ltc_loss(logits, values, collate_episodes([ep], pad_id=0), LossWeights(ppo_coef=0.0))[0].backward()
    assert logits.grad[0, :-1].abs().sum(-1).min() > 0


@pytest.mark.parametrize("loss", ["full", "lm"])
def test_a_few_ltc_steps_change_exactly_the_trainable_params(tok, hydra, loss):  # noqa: F811
    import copy

    from minilm.loop import make_optimizer
    from minilm.runtime import setup_runtime
    from minilm.stages.ltc import ltc_config, update
    model = copy.deepcopy(hydra)
    model.lm.model.layers[0].input_layernorm.weight.requires_grad_(False)          # a frozen parameter
    cfg = ltc_config(loss=loss, batch_size=2, lr=1e-2)
    torch.manual_seed(3)
    episodes = run_episodes(model, tok, [CountEnv() for _ in range(4)], [0, 1, 2, 3],
                            make_pattern("dialogue"), RolloutConfig(max_reply_tokens=6))
    episodes[0].success, episodes[0].reward = True, 1.0    # one success so the LM term has weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, cfg.optim)
    if loss == "lm":        # LM loss alone, no success in the batch: skipped, nothing moves
        assert update(model, optimizer, episodes[1:], cfg, cfg.optim.lr, setup_runtime("cpu"), 0, tok.eot_id) == []
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    rows = update(model, optimizer, episodes, cfg, cfg.optim.lr, setup_runtime("cpu"), 0, tok.eot_id)
    # minibatches {2, 0} and {1, 3} (seed 0): "lm" skips the one without a success
    assert len(rows) == (1 if loss == "lm" else 2) and all(math.isfinite(r["loss"]) for r in rows)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        frozen = n == "lm.model.layers.0.input_layernorm.weight"
        value_head_idle = loss == "lm" and n.startswith("heads.")        # no value loss in "lm"
        assert changed == (not frozen and not value_head_idle), n


def fake_run(tok, tmp_path, monkeypatch, plots=False, **overrides):
    """run_ltc's keyword arguments for a seconds-long run on CountEnv from a random tiny model
    (matplotlib, ~1.5 s a figure, is stubbed out unless `plots`)."""
    from minilm.checkpoint import save_checkpoint
    from minilm.model import Phi3
    from minilm.stages import ltc
    if not plots:
        monkeypatch.setattr(ltc, "plot_curves", lambda *args, **kwargs: False)
        monkeypatch.setattr("minilm.loop.plot_losses", lambda *args, **kwargs: None)
    if not (tmp_path / "init").exists():
        torch.manual_seed(0)
        save_checkpoint(tmp_path / "init", Phi3(tiny_config(max_seq_len=256)), tok)
    monkeypatch.setattr(ltc, "make_envs", lambda cfg, split, n: [CountEnv() for _ in range(n)])
    return {**dict(init=str(tmp_path / "init"), out_dir=str(tmp_path / "run"), pattern="analogue", n_demos=8,
                   il_steps=4, episodes_per_iter=4, batch_size=2, rollout_batch=4, n_test=4, device="cpu"),
            **overrides}


def checkpoint_tensors(path) -> dict:
    from minilm.checkpoint import load_checkpoint
    ck = load_checkpoint(path, with_train_state=True)
    opt = ck.train_state["optimizer"]["state"]
    return {**{f"lm.{k}": v for k, v in ck.model.state_dict().items()},
            **{f"heads.{k}": v for k, v in ck.extra["heads"].items()},
            **{f"adam.{i}.{k}": v for i, st in opt.items() for k, v in st.items() if torch.is_tensor(v)}}


def test_run_ltc_end_to_end_and_a_killed_run_resumes_bit_identically(tok, tmp_path, monkeypatch):  # noqa: F811
    """Kill after iteration 1 of 2 (an exception right after its checkpoint), rerun the same
    command: weights, value head, Adam moments, metrics and buffer equal the uninterrupted run's."""
    from minilm.stages import ltc
    kw = fake_run(tok, tmp_path, monkeypatch, plots=True, iterations=2)
    whole = ltc.run_ltc(ltc.ltc_config(**{**kw, "out_dir": str(tmp_path / "whole")}))
    assert [r["iteration"] for r in whole["rows"]] == [1, 2] and whole["rows"][1]["buffer"] == 8
    assert (tmp_path / "whole" / "curves.png").exists() and (tmp_path / "whole" / "baseline.json").exists()
    saved = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert set(saved["baseline"]) >= {"success", "score"} and 0 <= saved["ltc"]["success"] <= 1
    plot, calls = ltc.plot_curves, []

    def killed(*args, **kwargs):         # plot_curves runs right after the iteration's checkpoint
        calls.append(1)
        plot(*args, **kwargs)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ltc, "plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        ltc.run_ltc(ltc.ltc_config(**kw))
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 1
    resumed = ltc.run_ltc(ltc.ltc_config(**kw))
    assert resumed["rows"] == whole["rows"]          # every loss and rate, exactly
    dirs = (tmp_path / "whole" / "checkpoint", tmp_path / "run" / "checkpoint")
    a, b = checkpoint_tensors(dirs[0]), checkpoint_tensors(dirs[1])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    from minilm.checkpoint import load_checkpoint
    bufs = [load_checkpoint(d, with_train_state=True).train_state["buffer"] for d in dirs]
    assert [e.tokens for e in bufs[0]] == [e.tokens for e in bufs[1]] and len(bufs[0]) == 8


def test_run_ltc_with_lora_trains_only_the_adapters_and_the_value_head(tok, tmp_path, monkeypatch):  # noqa: F811
    """cfg.lora_r > 0: instruction tuning and the LTC updates move the LoRA adapters and the value
    head only; the base weights stay bit-identical to the init checkpoint, also once saved."""
    from minilm.checkpoint import load_checkpoint
    from minilm.lora import base_state_dict
    from minilm.post.heads import HydraModel
    from minilm.stages import ltc
    made = []

    def recording_hydra(lm, heads):      # snapshot the parameters as the LTC phase starts
        h = HydraModel(lm, heads=heads)
        made.append((h, {n: p.detach().clone() for n, p in h.named_parameters()}))
        return h
    monkeypatch.setattr(ltc, "HydraModel", recording_hydra)
    kw = fake_run(tok, tmp_path, monkeypatch, iterations=1, lora_r=4, lr=1e-2, pattern="dialogue")
    init = load_checkpoint(kw["init"]).model.state_dict()
    result = ltc.run_ltc(ltc.ltc_config(**kw))
    assert math.isfinite(result["rows"][0]["loss"])
    hydra, before = made[0]
    adapters = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 2 * 4 * 2           # A and B x 4 target layers x 2 blocks
    for n, p in hydra.named_parameters():
        trainable = n in adapters or n.startswith("heads.")
        assert p.requires_grad == trainable and (not torch.equal(before[n], p)) == trainable, n
    assert all(before[n].abs().max() > 0 for n in adapters if ".lora_B." in n)   # B starts at 0: IL trained it
    for model in (hydra.lm, load_checkpoint(result["checkpoint"]).model):
        base = base_state_dict(model)
        assert base.keys() == init.keys() and all(torch.equal(base[k], init[k]) for k in init)


def test_lm_agent_only_restricts_the_lm_loss_to_the_agents_tokens():
    ep = hand_episode([0, 1, 1, 0, 1, 0], 1.0, True, tokens=[3, 0, 4, 2, 1, 4])
    batch = collate_episodes([ep], pad_id=0)
    logits = torch.randn(1, 6, 5)
    _, m = ltc_loss(logits, torch.zeros(1, 6), batch, LossWeights(ppo_coef=0.0, lm_agent_only=True))
    logp = torch.log_softmax(logits[0], -1)
    expected = -(logp[0, 0] + logp[1, 4] + logp[3, 1]).item() / 3       # tokens 1, 2, 4
    assert m["lm_loss"] == pytest.approx(expected, abs=1e-5)
