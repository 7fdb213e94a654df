"""PPO math on hand-built tensors: GAE by hand, loss signs and clipping, whitening, KL (lesson 08)."""

import copy
import math

import pytest
import torch
from conftest import tiny_config
from test_reward import base_checkpoint  # noqa: F401
from test_rollout import byte_tok, hand_rollout  # noqa: F401

from data_prep.instructions import instruction_examples
from minilm import MinilmError
from minilm.config import build
from minilm.generate import token_logprobs
from minilm.loop import make_optimizer
from minilm.model import Phi3
from minilm.post.base_model import LoRAConfig
from minilm.post.chat import TurnClose, parse_reply, render_prompt
from minilm.post.heads import HydraModel, last_token_index
from minilm.post.oracles import AnswerOracle
from minilm.post.ppo import (AdaptiveKLController, FixedKLController, action_values, entropy_from_logits, gae,
                             kl_penalty, logprobs_from_logits, masked_mean, masked_whiten, ppo_policy_loss,
                             shape_rewards, value_loss)
from minilm.post.ppo_models import build_models
from minilm.post.ppo import make_kl_controller
from minilm.post.preferences import encode_pairs, pair_batch
from minilm.post.reward import pair_scores
from minilm.stages import ppo as ppo_stage
from minilm.stages.ppo import PPOConfig, heldout_eval, ppo_step, rollout_and_score

pytestmark = pytest.mark.lesson_08

# Row 0: a prompt token (column 0), then 3 generated tokens. Row 1: 2 generated tokens, then the
# right padding after its stop token. Numbers outside the mask are junk that must not leak in.
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
REWARDS = torch.tensor([[5.0, 0.5, -1.0, 2.0], [1.0, 3.0, 7.0, 7.0]])
VALUES = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.5, -0.5, 4.0, 4.0]])


def gae_by_hand(rewards, values, mask, gamma, lam):
    """One row at a time over the list of generated tokens, with plain floats."""
    adv_rows, ret_rows = [], []
    for r_row, v_row, m_row in zip(rewards.tolist(), values.tolist(), mask.tolist()):
        idx = [t for t, m in enumerate(m_row) if m]
        adv, ret, running = [0.0] * len(m_row), [0.0] * len(m_row), 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v_row[idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r_row[t] + gamma * next_v - v_row[t]
            running = delta + gamma * lam * (running if k + 1 < len(idx) else 0.0)
            adv[t], ret[t] = running, running + v_row[t]
        adv_rows.append(adv), ret_rows.append(ret)
    return torch.tensor(adv_rows), torch.tensor(ret_rows)


def test_gae_matches_a_hand_computation():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    want_adv, want_ret = gae_by_hand(REWARDS, VALUES, MASK, 0.9, 0.8)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    # row 1 written out: A_1 = 3 - (-0.5) = 3.5; A_0 = 1 + 0.9 * (-0.5) - 0.5 + 0.72 * 3.5 = 2.57
    assert adv[1, 1].item() == pytest.approx(3.5) and adv[1, 0].item() == pytest.approx(2.57)
    # row 0, last token: A = 2 - 3 = -1; nothing outside the mask
    assert adv[0, 3].item() == pytest.approx(-1.0)
    assert (adv[MASK == 0] == 0).all() and (ret[MASK == 0] == 0).all()


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    _, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    masked = REWARDS * MASK
    reward_to_go = masked.flip(1).cumsum(1).flip(1) * MASK
    torch.testing.assert_close(ret, reward_to_go)
    assert ret[0, 1].item() == pytest.approx(1.5) and ret[1, 0].item() == pytest.approx(4.0)


def test_gae_lambda_zero_is_one_step_td():
    adv, _ = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.0)
    # row 0, column 1: r + 0.9 * V_2 - V_1 = 0.5 + 1.8 - 1
    assert adv[0, 1].item() == pytest.approx(1.3)


def test_ratio_is_one_and_nothing_clipped_when_policy_equals_old():
    torch.manual_seed(0)
    logp = torch.randn(3, 5).clamp(max=0)
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    loss, m = ppo_policy_loss(logp.clone().requires_grad_(), logp, adv, mask, clip=0.2)
    assert m["ratio"] == 1.0 and m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)


def test_policy_gradient_raises_positive_and_lowers_negative_advantage_tokens():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = ppo_policy_loss(logp, logp.detach().clone(), adv, torch.ones(1, 2))
    loss.backward()
    # gradient descent moves logp against the gradient: up for A > 0, down for A < 0
    assert logp.grad[0, 0] < 0 and logp.grad[0, 1] > 0
    assert logp.grad[0, 0].item() == pytest.approx(-0.5) and logp.grad[0, 1].item() == pytest.approx(0.5)


def test_clipping_zeroes_the_gradient_beyond_the_trust_region():
    old = torch.zeros(1, 3)
    # ratios 1.5 with A > 0 (clipped), 0.5 with A < 0 (clipped), 1.5 with A < 0 (NOT clipped: pessimistic)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, m = ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0 and logp.grad[0, 2] > 0
    assert m["clipfrac"] == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.5) / 3)


def test_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 100.0, -100.0]])
    loss, _ = ppo_policy_loss(logp, logp.detach(), adv, torch.tensor([[1, 0, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and logp.grad[0, 1:].abs().sum() == 0
    with pytest.raises(ValueError, match="same"):
        ppo_policy_loss(logp, logp.detach(), adv[:, :2], torch.ones(1, 3))


def test_value_loss_clipping_by_hand():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.5]])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    loss.backward()
    # token 0: err (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 wins: constant, no gradient
    # token 1: err (1-0.5)^2 = 0.25, clipped (0.2-0.5)^2 = 0.09: the unclipped error wins
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25) / 2)
    assert values.grad[0, 0] == 0 and values.grad[0, 1].item() == pytest.approx(0.5 * 0.5)
    assert m["vf_clipfrac"] == 0.5
    plain, _ = value_loss(values, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1 + 0.25) / 2)


def test_explained_variance_by_hand_and_for_constant_returns():
    mask = torch.ones(1, 4)
    returns = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # var 1.25
    _, m = value_loss(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), returns, returns, mask, clip=None)
    assert m["explained_variance"] == pytest.approx(1 - (0.1875 / 1.25))  # var(R - V) of (0, 0, 0, 1)
    # every return -0.1: float32 rounding leaves var ~1e-16, which must read as "constant", not -1e11
    constant = torch.full((1, 96), -0.1)
    _, m = value_loss(torch.randn(1, 96), constant, constant, torch.ones(1, 96), clip=None)
    assert m["explained_variance"] == 0.0


def test_whitening_gives_mean_zero_std_one_over_the_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 9) * 3 + 7
    mask = torch.ones(4, 9)
    mask[0, :3] = 0
    mask[2, 6:] = 0
    w = masked_whiten(x, mask)
    sel = w[mask.bool()]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert sel.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match="no element"):
        masked_mean(x, torch.zeros(2, 3))


def test_kl_estimators_by_hand_and_unbiased_on_samples():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])
    mask = torch.tensor([[1, 0]])
    assert kl_penalty(lp, ref, mask).tolist() == [[1.0, 0.0]]                     # k1 = d, masked
    assert kl_penalty(lp, ref, mask, "k2")[0, 0].item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, mask, "k3")[0, 0].item() == pytest.approx(math.exp(-1) - 1 + 1)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(lp, ref, mask, "k4")
    # KL(p || q) of two categoricals, estimated from samples of p: k1 and k3 are unbiased
    torch.manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()
    a = torch.multinomial(p, 200_000, replacement=True)[None]
    lp, ref, ones = p.log()[a], q.log()[a], torch.ones_like(a)
    for kind in ("k1", "k3"):
        assert kl_penalty(lp, ref, ones, kind).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (kl_penalty(lp, ref, ones, "k3") >= 0).all()


def test_shape_rewards_puts_the_score_on_the_last_generated_token():
    kl = torch.tensor([[9.0, 1.0, 2.0, 3.0], [1.0, -1.0, 9.0, 9.0]]) * MASK
    r = shape_rewards(torch.tensor([10.0, -10.0]), kl, MASK, beta=0.5)
    assert r.tolist() == [[0.0, -0.5, -1.0, 8.5], [-0.5, -9.5, 0.0, 0.0]]
    clipped = shape_rewards(torch.tensor([10.0, -10.0]), kl, MASK, beta=0.5, score_clip=5.0)
    assert clipped[0, 3].item() == 3.5 and clipped[1, 1].item() == -4.5
    with pytest.raises(ValueError, match="empty"):
        shape_rewards(torch.zeros(2), kl, torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]]), beta=0.1)


def test_entropy_from_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    want = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), want)
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))


def test_logprobs_from_logits_match_token_logprobs_and_values_shift():
    model = Phi3(tiny_config()).eval()
    tokens = torch.randint(1, 320, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0                                   # a left-padded row
    with torch.no_grad():
        logits, _ = model(tokens, attention_mask=mask)
        want = token_logprobs(model, tokens, mask)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, mask), want)
    assert action_values(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[0.0, 1.0, 2.0]]


def test_kl_controllers_move_beta_the_right_way():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=100)                     # KL too high: error clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    before = ctl.value
    ctl.update(3.0, n_steps=100)                      # KL too low: beta falls
    assert ctl.value < before
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl2.update(6.0, n_steps=100)
    assert ctl2.value == 0.1
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


# ---- the PPO step on tiny models, every variant ----

def peaked_lm():
    """A tiny Phi3 whose (tied) embeddings are large enough for LoRA to move the logits, as in a
    trained model; at the default init every distribution is nearly uniform and only full
    fine-tuning of the embeddings could change that."""
    lm = Phi3(tiny_config())
    torch.nn.init.normal_(lm.model.embed_tokens.weight, std=0.2)
    return lm


def tiny_models(variant, head_std=0.5, **cfg_overrides):
    torch.manual_seed(0)
    fields = dict(batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-2, lora_r=4)
    cfg = build(PPOConfig, **{**fields, **cfg_overrides})
    reward = HydraModel(peaked_lm(), heads=("reward",))
    torch.nn.init.normal_(reward.heads["reward"].weight, std=head_std)   # a reward that varies
    sft = peaked_lm() if variant in ("ppo", "lora") else None
    return cfg, build_models(variant, cfg.lora, reward, sft)


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
CLOSE = TurnClose(ids=(319, 10), specials=(319,))   # a stand-in <|end|> "\n" for the tokenizer-less models


@pytest.mark.parametrize("variant", ["ppo", "lora", "hydra", "jhydra"])
def test_ppo_step_trains_exactly_the_trainable_parameters(variant):
    cfg, models = tiny_models(variant)
    before = {n: p.detach().clone() for n, p in models.named_parameters()}
    trainable = {n for n, p in models.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(models, cfg.optim)
    row = ppo_step(models, PROMPTS, cfg, optimizer, make_kl_controller(cfg), pad_id=0, close=CLOSE)
    # the first minibatch sees the policy that sampled: ratio 1, nothing clipped
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-5) and row["first_clipfrac"] == 0.0
    assert row["kl"] == pytest.approx(0.0, abs=1e-5)       # actor == reference before the update
    for key in ("score", "pg_loss", "vf_loss", "entropy", "approx_kl", "grad_norm", "length"):
        assert math.isfinite(row[key]), key
    changed = {n for n, p in models.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (sorted(trainable - changed)[:5], sorted(changed - trainable)[:5])
    lora = [n for n in trainable if "lora_" in n]
    if variant == "ppo":
        assert not lora and any(n.startswith("actor.") for n in trainable)
    else:
        assert lora and all("lora_" in n or "heads.value" in n for n in trainable)
    if variant == "jhydra":
        assert all(n.endswith(".joint") for n in lora)
    if variant == "hydra":
        assert {n.rsplit(".", 1)[-1] for n in lora} == {"actor", "critic"}


def test_hydra_reference_and_reward_are_the_base_model_with_lora_off():
    torch.manual_seed(0)
    base = HydraModel(Phi3(tiny_config()), heads=("reward",))
    original = copy.deepcopy(base)
    models = build_models("hydra", LoRAConfig(r=4), base)
    for p in models.parameters():                       # pretend the adapters were trained
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    tokens, mask = torch.randint(1, 320, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(models.reference_logits(tokens, mask), original.lm(tokens, attention_mask=mask)[0])
        assert torch.equal(models.score(tokens, mask), original.score(tokens, mask))
        actor, _ = models.policy_and_values(tokens, mask)
    assert not torch.allclose(actor, original.lm(tokens, attention_mask=mask)[0])


@pytest.mark.parametrize("variant", ["ppo", "lora", "hydra", "jhydra"])
def test_every_variant_raises_a_planted_reward(variant):
    """Prompts of high token ids; reward = share of generated ids below 32 (10% of the vocabulary).

    The value head starts near 0, on the scale of this reward: a value head copied from a reward
    head of another scale gives value-loss gradients that swamp the policy's in the joint adapter
    (jhydra then stalls at this lr: a real trade-off of sharing one adapter).
    """
    cfg, models = tiny_models(variant, head_std=0.01, kl_coef=0.01, max_new_tokens=4, max_steps=16,
                              min_lr_ratio=1.0, batch_size=16, minibatch_size=8)
    optimizer, kl_ctl = make_optimizer(models, cfg.optim), make_kl_controller(cfg)

    def low_id_share(rollout):
        gen = rollout.gen_mask
        return ((rollout.tokens < 32).float() * gen).sum(1) / gen.sum(1)

    prompts = [[300 + t for t in p] for p in PROMPTS] * 4
    scores = [ppo_step(models, prompts, cfg, optimizer, kl_ctl, step=s, score_fn=low_id_share)["score"]
              for s in range(cfg.max_steps)]
    assert scores[0] < 0.1 and sum(scores[-4:]) / 4 > 0.8, scores


@pytest.mark.parametrize("variant", ["lora", "hydra", "jhydra"])
def test_rollouts_are_sampled_from_the_actor_adapters(variant):
    """Sampling log-probs (KV cache, inside models.sampler()) equal the actor's recomputed ones."""
    cfg, models = tiny_models(variant)
    for name, p in models.named_parameters():          # adapters that change the model
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = rollout_and_score(models, PROMPTS, cfg, pad_id=0, stop_tokens=(), kl_coef=0.05, close=CLOSE)
    mask = batch["mask"].bool()
    torch.testing.assert_close(batch["rollout"].logprobs[mask], batch["logprobs"][mask], atol=1e-4, rtol=0)
    assert batch["stats"]["kl"] != 0                      # and the actor is not the reference


def test_hydra_raises_the_score_of_its_own_reward_head():
    """The reward is the Hydra model's reward head with LoRA off (dynamic LoRA), as in the paper,
    read on the closing tokens appended to each reply (every reply here is cut: all pay the penalty).

    The closing tokens get zero embeddings, so the head reads only what attention gathered from
    prompt and reply (a trained reward model's reading); with their own random embeddings they
    would swamp the reply's share in this untrained model and leave PPO nothing to raise.
    """
    cfg, models = tiny_models("hydra", head_std=0.5, kl_coef=0.01, max_new_tokens=4, max_steps=10,
                              batch_size=16, minibatch_size=8, min_lr_ratio=1.0)
    with torch.no_grad():
        models.hydra.lm.model.embed_tokens.weight[list(CLOSE.ids)] = 0
    optimizer, kl_ctl = make_optimizer(models, cfg.optim), make_kl_controller(cfg)
    prompts = [[300 + t for t in p] for p in PROMPTS] * 4
    scores = [ppo_step(models, prompts, cfg, optimizer, kl_ctl, step=s, close=CLOSE)["score"]
              for s in range(cfg.max_steps)]
    assert sum(scores[-3:]) / 3 > scores[0] + 0.4, scores


# ---- where PPO reads the reward: the token reward training reads ----

class ReadTokenReward(torch.nn.Module):
    """A hand-built reward model whose score names the token it read and that token's position:
    1000 * (real tokens up to it) + its id. Two readings agree only on the same token of the same
    sequence."""

    def score(self, tokens, attention_mask, head="reward"):
        read = tokens.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)   # (B,)
        return (1000 * attention_mask.sum(1) + read).float()


@pytest.mark.parametrize("variant", ["lora", "hydra"])
def test_ppo_reads_the_reward_on_the_token_reward_training_reads(byte_tok, monkeypatch, variant):  # noqa: F811
    """Ended and cut replies alike: PPO's score (rollout and held-out) is the reward-training score
    of the same reply, read on the "\n" after <|end|>; a reply that did not end loses the penalty."""
    tok, penalty = byte_tok, 0.25
    convs = instruction_examples(4, 0, ("arithmetic",), split="heldout")
    prompts = [render_prompt(tok, c["messages"][:-1]) for c in convs]
    end, user, eot = (tok.special_id(s) for s in ("<|end|>", "<|user|>", "<|endoftext|>"))
    replies = [tok.encode("50") + [end],                      # ended
               tok.encode("8 is"),                            # cut at the budget
               tok.encode("12") + [user] + tok.encode("x"),   # ran on into another turn
               tok.encode("7") + [eot]]                       # stopped at <|endoftext|>
    rollout = hand_rollout(prompts, replies, tok.eot_id)
    monkeypatch.setattr(ppo_stage, "generate", lambda *args, **kwargs: rollout)   # the rollout, sampled
    cfg, models = tiny_models(variant, max_new_tokens=4, missing_end_penalty=penalty)
    reward = ReadTokenReward()
    if variant == "lora":
        models.reward = reward
    else:
        monkeypatch.setattr(models.hydra, "score", reward.score)   # read with LoRA off, as the stage does
    # reward training's reading: each reply as a pair side, scored by pair_scores (reward_loss)
    texts, ended = zip(*(parse_reply(tok, r) for r in replies))
    pairs = [{"prompt": c["messages"][:-1], "chosen": t, "rejected": t} for c, t in zip(convs, texts)]
    encoded, _ = encode_pairs(tok, pairs, max_len=64)
    trained, _, _ = pair_scores(reward, pair_batch(encoded, tok.eot_id, 64))
    want = trained - penalty * (~torch.tensor(ended)).float()
    assert list(ended) == [True, False, False, False]
    batch = rollout_and_score(models, prompts, cfg, tok.eot_id, (end, eot), kl_coef=0.05, close=TurnClose.of(tok))
    torch.testing.assert_close(batch["scores"], want)
    judged = heldout_eval(models, tok, convs, AnswerOracle(convs), 4, missing_end_penalty=penalty)
    assert judged["rm_score"] == pytest.approx(want.mean().item())
    with pytest.raises(MinilmError, match="close"):
        rollout_and_score(models, prompts, cfg, tok.eot_id, (end, eot), kl_coef=0.05)


@pytest.fixture(scope="module")
def reward_checkpoint(base_checkpoint, tmp_path_factory):
    """The base checkpoint with a (random) reward head saved beside it: a stand-in Hydra-SFT model."""
    from minilm.checkpoint import load_checkpoint, save_checkpoint
    ck = load_checkpoint(base_checkpoint)
    hydra = HydraModel(ck.model)
    torch.nn.init.normal_(hydra.heads["reward"].weight, std=0.1)
    path = tmp_path_factory.mktemp("rm") / "checkpoint"
    save_checkpoint(path, ck.model, ck.tokenizer, meta={"stage": "reward"},
                    extra={"heads": hydra.heads.state_dict()})
    return path


@pytest.mark.parametrize("variant,reward", [("lora", "model"), ("hydra", "oracle")])
def test_run_ppo_end_to_end(base_checkpoint, reward_checkpoint, tmp_path, variant, reward):
    import json

    from minilm.checkpoint import load_checkpoint
    from minilm.stages.ppo import ppo_config, run_ppo
    init = reward_checkpoint if variant == "hydra" else base_checkpoint
    cfg = ppo_config("tiny", variant=variant, reward=reward, init=str(init),
                     reward_init=str(reward_checkpoint),
                     out_dir=str(tmp_path / "ppo"), max_steps=2, batch_size=4, minibatch_size=2,
                     max_new_tokens=8, n_prompts=40, n_eval=4, eval_every=2, device="cpu", lora_r=4,
                     sources="arithmetic,units")
    result = run_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["first_clipfrac"] == 0.0
    assert set(result["before"]) == set(result["after"]) >= {"reward", "end_rate", "rm_score"}
    ck = load_checkpoint(result["checkpoint"])
    assert ck.meta["variant"] == variant and ck.model.config.vocab_size == 320
    with pytest.raises(MinilmError, match="variant"):
        ppo_config("tiny", variant="hydra2")
