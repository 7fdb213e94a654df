"""The LTC loss and loop (minilm/agents/ltc_data.py, minilm/stages/ltc.py, lessons/10_ltc.md)."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from test_patterns import CountEnv, hydra, tok  # noqa: F401

from minilm.agents.ltc_data import LossWeights, collate_episodes, ltc_advantages, ltc_loss, monte_carlo_returns
from minilm.agents.patterns import (AGENT, SAMPLED, SYSTEM, TEACHER, VETOED, Episode, RolloutConfig, _agent_turn,
                                    make_pattern, run_episodes)

pytestmark = pytest.mark.lesson_10


def hand_episode(who, reward, success, tokens=None):
    n = len(who)
    return Episode(tokens=tokens or list(range(1, n + 1)), who=list(who),
                   logprobs=[-1.0 if w in SAMPLED else 0.0 for w in who],
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
    tokens = batch["tokens"][0].tolist()
    agent, teacher, vetoed = (batch[k][0].tolist() for k in ("agent_mask", "teacher_mask", "vetoed_mask"))
    logp = torch.log_softmax(logits[0].double(), -1)                            # the model (LM loss)
    logp_pi = torch.log_softmax(logits[0].double() / (w.temperature or 1.0), -1)   # the sampling policy
    imitated = [t for t in range(1, len(tokens)) if (agent[t] and not vetoed[t]) or teacher[t]]
    lm = -sum(logp[t - 1, tokens[t]].item() for t in imitated) / len(imitated) * batch["lm_weight"][0].item()
    executed = [t for t in range(len(tokens)) if agent[t] and not vetoed[t]]
    g = batch["rewards"][0].sum().item()
    idx = [t for t in range(len(tokens)) if agent[t] or teacher[t]]
    n_agent = sum(agent)
    pg = vf = ent = 0.0
    for t in idx:
        # a teacher token sees the return of the turns after it; a vetoed turn is its own -1
        ret = math.tanh(-1.0 if vetoed[t] else g if any(k > t for k in executed) or agent[t] else 0.0)
        old_v, old_lp = (0.0, 1.0) if teacher[t] else (batch["old_values"][0, t].item(), batch["old_logprobs"][0, t].item())
        a = ret - old_v
        ratio = math.exp(logp_pi[t - 1, tokens[t]].item() - old_lp)
        pg += max(-a * ratio, -a * min(max(ratio, 1 - w.clip), 1 + w.clip)) / len(idx)
        if agent[t]:
            vf += 0.5 * (values[0, t - 1].item() - ret) ** 2 / n_agent
        p = logp_pi[t - 1].exp()
        ent += -(p * logp_pi[t - 1]).sum().item() / len(idx)
    return lm, pg, vf, ent


@pytest.mark.parametrize("lm_coef,ppo_coef,temperature", [(1.0, 0.5, 1.0), (1.0, 0.0, 1.0), (0.0, 0.5, 1.0),
                                                          (1.0, 0.5, 0.7)])
def test_loss_combination_on_hand_built_tensors(lm_coef, ppo_coef, temperature):
    torch.manual_seed(0)
    ep = hand_episode([0, 1, 3, 0, 2, 2, 0, 1, 1, 0, 2], 1.0, True, tokens=[3, 0, 4, 2, 1, 4, 0, 2, 3, 1, 2])
    ep.logprobs = [0.0, -1.2, -0.3, 0.0, 0.0, 0.0, 0.0, -2.0, -0.1, 0.0, 0.0]
    batch = collate_episodes([ep], pad_id=0)
    logits, values = torch.randn(1, 11, 5), torch.randn(1, 11).tanh()
    w = LossWeights(lm_coef=lm_coef, ppo_coef=ppo_coef, temperature=temperature)
    loss, m = ltc_loss(logits, values, batch, w)
    lm, pg, vf, ent = loss_by_hand(logits, values, batch, w)
    assert m["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert loss.item() == pytest.approx(lm_coef * lm + ppo_coef * (pg + vf - 0.01 * ent), abs=1e-5)
    if ppo_coef:
        assert (m["pg_loss"], m["vf_loss"], m["entropy"]) == pytest.approx((pg, vf, ent), abs=1e-5)


def role_gradients(ep, **weights):
    """(d L / d logits summed over the vocabulary, d L / d values), each (T,), for one episode."""
    torch.manual_seed(0)
    n = len(ep.tokens)
    logits, values = torch.randn(1, n, 5, requires_grad=True), torch.randn(1, n, requires_grad=True)
    ltc_loss(logits, values, collate_episodes([ep], pad_id=0), LossWeights(**weights))[0].backward()
    no_value_term = values.grad is None        # ppo_coef = 0
    return logits.grad[0].abs().sum(-1), torch.zeros(n) if no_value_term else values.grad[0].abs()


def test_system_text_gets_no_loss_agent_tokens_all_three_and_teacher_text_the_policy_loss_without_value():
    who = [SYSTEM, SYSTEM, AGENT, AGENT, SYSTEM, TEACHER, TEACHER, SYSTEM, AGENT, SYSTEM]
    ep = hand_episode(who, 1.0, True, tokens=[1, 2, 3, 4, 0, 1, 2, 3, 4, 0])
    # position t - 1 predicts token t: the gradient of token t's terms lands on position t - 1
    before = [w for w in who[1:]] + [SYSTEM]
    at = {r: torch.tensor([b == r for b in before]) for r in (SYSTEM, AGENT, TEACHER)}
    g_logits, g_values = role_gradients(ep)                                  # the full loss
    assert g_logits[at[SYSTEM]].max() == 0 and g_values[~at[AGENT]].max() == 0
    assert g_logits[at[AGENT]].min() > 0 and g_values[at[AGENT]].min() > 0
    # teacher text is imitated by the policy loss alone (the reference code's policy_mask), not only by L_LM
    g_policy, _ = role_gradients(ep, lm_coef=0.0, ent_coef=0.0)
    assert g_policy[at[TEACHER]].min() > 0 and g_policy[at[SYSTEM]].max() == 0
    # ... and never unlearned: in a failed episode the clipped surrogate gives teacher text no gradient
    ep.success, ep.reward = False, -1.0
    assert role_gradients(ep, lm_coef=0.0, ent_coef=0.0)[0][at[TEACHER]].max() == 0
    # the LM loss reaches agent and teacher text, never the system's or the environment's
    ep.success, ep.reward = True, 1.0
    g_lm, _ = role_gradients(ep, ppo_coef=0.0)
    assert g_lm[at[SYSTEM]].max() == 0 and g_lm[at[AGENT] | at[TEACHER]].min() > 0


def test_a_vetoed_action_gets_minus_one_and_no_imitation_even_when_the_hint_rescues_the_episode(tok):  # noqa: F811
    env, ep, cfg = CountEnv(), Episode(seed=3), RolloutConfig()
    pattern = make_pattern("dialogue")
    pattern.begin(env, ep, tok, cfg)
    prefix, end = [tok.special_id("<|assistant|>")] + tok.encode("\n"), tok.special_id("<|end|>")
    for text in ("answer[4]", "think[it is 3]", "answer[3]"):     # wrong (vetoed), then the hint's way
        ep.add(prefix, SYSTEM)
        reply = tok.encode(text) + [end]
        pattern.respond(env, ep, tok, _agent_turn(tok, ep, reply, [-0.5] * len(reply)), cfg)
    assert ep.success and ep.hints == 1
    ep.reward, ep.values = 1.0, [0.0] * len(ep.tokens)
    who = torch.tensor(ep.who)
    assert (who == VETOED).sum() == len(tok.encode("answer[4]")) + 1
    batch = collate_episodes([ep], pad_id=tok.eot_id)
    returns, adv = ltc_advantages(batch, LossWeights())
    assert torch.allclose(returns[0, who == VETOED], torch.tensor(math.tanh(-1.0)))
    assert (adv[0, who == VETOED] < 0).all() and (adv[0, who == AGENT] > 0).all()
    # no LM imitation of the vetoed reply: no gradient at the positions that predict it
    logits = torch.randn(1, len(ep.tokens), tok.n_vocab, requires_grad=True)
    ltc_loss(logits, torch.zeros(1, len(ep.tokens)), batch, LossWeights(ppo_coef=0.0))[0].backward()
    before = torch.cat([who[1:], torch.tensor([SYSTEM])])      # position t - 1 predicts token t
    assert logits.grad[0, before == VETOED].abs().max() == 0
    assert logits.grad[0, before == AGENT].abs().sum(-1).min() > 0


def test_by_default_no_token_of_an_all_failed_batch_gets_a_positive_advantage():
    eps = [hand_episode([0, 1, 1, 0, 2, 1, 0], -1.0, False), hand_episode([0, 0, 1, 1, 3, 1], -1.0, False)]
    for ep in eps:      # old values spread over [-0.6, 0.6], as a critic that has seen some successes
        ep.values = [-0.6 + 0.2 * i for i in range(len(ep.tokens))]
    batch = collate_episodes(eps, pad_id=0)
    policy = (batch["agent_mask"] + batch["teacher_mask"]).bool()
    returns, adv = ltc_advantages(batch, LossWeights())
    assert torch.allclose(returns[policy], torch.tensor(math.tanh(-1.0))) and (adv[policy] < 0).all()
    # what per-minibatch whitening (opt-in) does to the same batch: failures with A > 0
    assert (ltc_advantages(batch, LossWeights(whiten_advantages=True))[1][policy] > 0).any()
    from minilm.stages.ltc import loss_weights, ltc_config
    assert not loss_weights(ltc_config()).whiten_advantages
    assert loss_weights(ltc_config(whiten_advantages=True)).whiten_advantages


def test_the_lm_loss_averages_over_successful_tokens_so_the_success_share_does_not_scale_it():
    tokens = [3, 0, 4, 2, 1, 4]
    win = hand_episode([0, 1, 1, 0, 1, 0], 1.0, True, tokens=tokens)
    fails = [hand_episode([0, 1, 1, 0, 1, 0], -1.0, False, tokens=tokens) for _ in range(3)]
    logits = torch.randn(4, 6, 5)
    w = LossWeights(ppo_coef=0.0)
    _, alone = ltc_loss(logits[:1], torch.zeros(1, 6), collate_episodes([win], 0), w)
    _, mixed = ltc_loss(logits, torch.zeros(4, 6), collate_episodes([win] + fails, 0), w)
    logp = torch.log_softmax(logits, -1)
    nll = [-sum(logp[b, t - 1, tokens[t]].item() for t in (1, 2, 4)) for b in range(4)]
    assert mixed["lm_loss"] == pytest.approx((nll[0] + 1e-5 * sum(nll[1:])) / 3, rel=1e-5)
    assert mixed["lm_loss"] == pytest.approx(alone["lm_loss"], rel=1e-3)     # 1 : 0.5, not 1/4 : 0.5


@pytest.mark.parametrize("temperature", [0.5, 1.3, 0.0])
def test_the_ppo_ratio_is_exactly_one_before_the_first_update_at_any_temperature(temperature):
    torch.manual_seed(0)
    ep = hand_episode([0, 1, 1, 0, 1, 0], 1.0, True, tokens=[3, 0, 4, 2, 1, 4])
    logits = 3 * torch.randn(1, 6, 5)
    # the log-probs generate() records: at logits / T when sampling, at T = 1 when greedy (T = 0)
    recorded = torch.log_softmax(logits[0] / (temperature or 1.0), -1)
    ep.logprobs = [recorded[t - 1, ep.tokens[t]].item() if w else 0.0 for t, w in enumerate(ep.who)]
    _, m = ltc_loss(logits, torch.zeros(1, 6), collate_episodes([ep], 0), LossWeights(temperature=temperature))
    assert m["ratio"] == pytest.approx(1.0, abs=1e-6) and m["approx_kl"] < 1e-12 and m["clipfrac"] == 0
    from minilm.stages.ltc import loss_weights, ltc_config
    assert loss_weights(ltc_config(temperature=temperature)).temperature == temperature


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
        monkeypatch.setattr("minilm.resume.plot_losses", lambda *args, **kwargs: None)
    if not (tmp_path / "init").exists():
        torch.manual_seed(0)
        save_checkpoint(tmp_path / "init", Phi3(tiny_config(max_seq_len=256)), tok)
    monkeypatch.setattr(ltc, "make_envs", lambda cfg, split, n: [CountEnv() for _ in range(n)])
    return {**dict(init=str(tmp_path / "init"), out_dir=str(tmp_path / "run"), pattern="analogue", n_demos=8,
                   il_steps=4, chat_replay=8,
                   episodes_per_iter=4, batch_size=2, rollout_batch=4, n_test=4, device="cpu"),
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
    assert 0 < whole["n_chat_replay"] <= 8      # the IL data keeps SFT conversations (those that fit)
    assert 0 <= whole["rows"][1]["test_success_with_example"] <= 1            # Analogue: both contexts
    assert (tmp_path / "whole" / "curves.png").exists() and (tmp_path / "whole" / "baseline.json").exists()
    saved = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert set(saved["baseline"]) >= {"success", "score", "success_with_example"} and 0 <= saved["ltc"]["success"] <= 1
    assert "success_with_example" in saved["ltc"]
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
    ep = hand_episode([0, 1, 1, 2, 1, 0], 1.0, True, tokens=[3, 0, 4, 2, 1, 4])
    batch = collate_episodes([ep], pad_id=0)
    logits = torch.randn(1, 6, 5)
    _, m = ltc_loss(logits, torch.zeros(1, 6), batch, LossWeights(ppo_coef=0.0, lm_agent_only=True))
    logp = torch.log_softmax(logits[0], -1)
    expected = -(logp[0, 0] + logp[1, 4] + logp[3, 1]).item() / 3       # tokens 1, 2, 4, not teacher 3
    assert m["lm_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("pattern", ["analogue", "dialogue"])
def test_analogue_evaluation_reports_success_with_and_without_the_solved_example(tok, hydra, monkeypatch, pattern):  # noqa: F811
    """Analogue trains with an example in every context: its evaluation also runs the same test
    seeds with one, next to the agent alone; other patterns train on what they are tested on."""
    from minilm.stages import ltc
    calls, collect = [], ltc.collect

    def spy(model, tok, envs, seeds, pat, rcfg):
        episodes = collect(model, tok, envs, seeds, pat, rcfg)
        calls.append((pat.name, seeds, [ep.messages[0]["content"] for ep in episodes]))
        return episodes
    monkeypatch.setattr(ltc, "collect", spy)
    cfg = ltc.ltc_config(pattern=pattern, n_test=3)
    out = ltc.evaluate(hydra, tok, [CountEnv() for _ in range(3)], cfg, example_env=CountEnv())
    assert calls[0][0] == "monologue" and not any("solved example" in m for m in calls[0][2])
    if pattern == "dialogue":
        assert len(calls) == 1 and "success_with_example" not in out
        return
    assert [c[:2] for c in calls] == [("monologue", [0, 1, 2]), ("analogue", [0, 1, 2])]
    assert all(m.startswith("Teacher: a solved example.") for m in calls[1][2])
    assert 0 <= out["success_with_example"] <= 1 and 0 <= out["score_with_example"] <= 1


def test_bad_ltc_settings_are_refused_by_name():
    from minilm.config import ConfigError
    from minilm.stages.ltc import ltc_config
    for bad, word in ((dict(chat_replay=-1), "chat_replay"), (dict(iterations=0), "iterations"),
                      (dict(pattern="chorus"), "pattern"), (dict(env="garden"), "env"),
                      (dict(teacher="t", pattern="monologue"), "teacher")):
        with pytest.raises(ConfigError, match=word):      # refused when the config is made
            ltc_config("ci", **bad)
