"""LTC's data and loss: expert demonstrations, the episode batch, Monte-Carlo returns, L_LM + 0.5 L_PPO.

    from minilm.agents.ltc_data import expert_demos, collate_episodes, ltc_loss
    demos = expert_demos(tok, env, seeds=range(256))            # (ids, loss_mask) chats for SFT
    batch = collate_episodes(episodes, pad_id=tok.eot_id, failed_lm_weight=1e-5)
    loss, metrics = ltc_loss(logits, head_values, batch, LossWeights())

Follows the reference code of Learning through Communication (Wang et al., arXiv 2310.01444):
returns are Monte-Carlo with gamma = 1 over agent tokens (all rewards are 0 except the terminal
+-1 on the last agent token, so every agent token's return is that reward); A_t = G_t - V_old(s_t),
whitened over the batch's agent tokens; the clipped policy loss, a 0.5 * MSE value loss (no value
clipping) and an entropy bonus act on agent tokens only; the LM loss is next-token cross-entropy
over EVERY token of the episode (environment and teacher text too) with failed episodes weighted
by ~1e-5. L = lm_coef * L_LM + ppo_coef * L_PPO, L_PPO = pg + vf_coef * vf - ent_coef * entropy.
The pure PPO pieces come from minilm/post/ppo.py; only the return and the loss assembly are new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minilm.post.chat import render_chat
from minilm.post.ppo import (entropy_from_logits, logprobs_from_logits, masked_mean, masked_whiten,
                             ppo_policy_loss, value_loss)


@dataclass
class LossWeights:
    lm_coef: float = 1.0
    ppo_coef: float = 0.5
    vf_coef: float = 1.0            # value_loss already carries the 0.5 of "0.5 * MSE"
    ent_coef: float = 0.01
    clip: float = 0.2
    lm_agent_only: bool = False     # not the paper: LM loss on the agent's tokens only (an experiment)


def expert_messages(env, seed: int) -> tuple[list[dict], bool]:
    """The scripted expert's episode on `seed` as a chat (observation, action, observation, ...)."""
    messages = [{"role": "user", "content": env.reset(seed)}]
    success = False
    for action in env.expert_actions():
        messages.append({"role": "assistant", "content": action})
        obs, _, done, info = env.step(action)
        success = bool(info.get("success", False))
        if done:
            break
        messages.append({"role": "user", "content": obs})
    return messages, success


def expert_demos(tok, env, seeds, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of expert episodes that succeed and fit max_len tokens (the SFT data)."""
    demos = []
    for seed in seeds:
        messages, success = expert_messages(env, seed)
        ids, mask = render_chat(tok, messages)
        if success and len(ids) <= max_len:     # never cut a demonstration: drop it
            demos.append((ids, mask))
    if not demos:
        raise ValueError(f"no expert episode of {getattr(env, 'name', env)} succeeded within {max_len} "
                         f"tokens; the environment's expert or its sizes are broken")
    return demos


def monte_carlo_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k >= t, on the mask} gamma^(#agent tokens between) r_k; 0 off the mask. (B, T).

    Non-agent tokens between two agent turns neither add reward nor discount: time is counted in
    agent tokens, as the reference code counts it.
    """
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        # an agent token adds its reward and discounts; any other token passes the return through
        running = torch.where(m[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running * m[:, t]
    return out


def collate_episodes(episodes, pad_id: int, failed_lm_weight: float = 1e-5) -> dict[str, torch.Tensor]:
    """Right-pad episodes into (B, T) tensors: tokens, attention_mask, agent_mask, old_logprobs,
    old_values, rewards (the +-1 on each row's last agent token), and lm_weight (B,)."""
    if not episodes:
        raise ValueError("collate_episodes needs at least one episode")
    b, width = len(episodes), max(len(ep.tokens) for ep in episodes)
    out = {"tokens": torch.full((b, width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((b, width), dtype=torch.long),
           "agent_mask": torch.zeros((b, width)),
           "old_logprobs": torch.zeros((b, width)), "old_values": torch.zeros((b, width)),
           "rewards": torch.zeros((b, width)), "lm_weight": torch.zeros(b)}
    for i, ep in enumerate(episodes):
        n = len(ep.tokens)
        if not (len(ep.who) == len(ep.logprobs) == len(ep.values) == n):
            raise ValueError(f"episode {i}: tokens, who, logprobs and values differ in length")
        out["tokens"][i, :n] = torch.tensor(ep.tokens)
        out["attention_mask"][i, :n] = 1
        out["agent_mask"][i, :n] = torch.tensor(ep.who, dtype=torch.float)
        out["old_logprobs"][i, :n] = torch.tensor(ep.logprobs)
        out["old_values"][i, :n] = torch.tensor(ep.values)
        last = ep.last_agent_index()
        if last >= 0:
            out["rewards"][i, last] = ep.reward
        out["lm_weight"][i] = 1.0 if ep.success else failed_lm_weight
    return out


def ltc_loss(logits: torch.Tensor, head_values: torch.Tensor, batch: dict, w: LossWeights):
    """(L, metrics) from one forward pass: logits (B, T, V), head_values (B, T) = V after token t."""
    tokens, attn, agent = batch["tokens"], batch["attention_mask"], batch["agent_mask"]
    logp = logprobs_from_logits(logits, tokens, attn)                            # (B, T)
    # the LM loss: every real token that has context, each episode weighted (failed ~ 0)
    lm_mask = (attn.long().cumsum(-1) > 1) & attn.bool()
    if w.lm_agent_only:
        lm_mask = lm_mask & agent.bool()
    lm_w = batch["lm_weight"][:, None].expand_as(logp)                           # (B, T)
    lm = masked_mean(-logp * lm_w, lm_mask)
    loss, metrics = w.lm_coef * lm, {"lm_loss": lm.item()}
    if w.ppo_coef > 0:
        # V(state before token t) = head at t - 1, as `action_values` shifts it
        values = torch.cat([head_values.new_zeros(head_values.shape[0], 1), head_values[:, :-1]], 1)
        returns = monte_carlo_returns(batch["rewards"], agent, gamma=1.0)       # (B, T): +-1 on agent tokens
        adv = masked_whiten(returns - batch["old_values"], agent)                # A = G - V_old, whitened
        pg, m_pg = ppo_policy_loss(logp, batch["old_logprobs"], adv, agent, clip=w.clip)
        vf, m_vf = value_loss(values, batch["old_values"], returns, agent, clip=None)
        # the distribution that produced token t is logits[:, t - 1]: shift like the values
        ent = entropy_from_logits(logits)
        ent = masked_mean(torch.cat([ent.new_zeros(ent.shape[0], 1), ent[:, :-1]], 1), agent)
        ppo = pg + w.vf_coef * vf - w.ent_coef * ent
        loss = loss + w.ppo_coef * ppo
        metrics.update(pg_loss=pg.item(), vf_loss=vf.item(), entropy=ent.item(), ppo_loss=ppo.item(),
                       **m_pg, **m_vf)
    return loss, metrics
