"""LTC's data and loss: expert demonstrations, the episode batch, Monte-Carlo returns, L_LM + 0.5 L_PPO.

    from minilm.agents.ltc_data import expert_demos, collate_episodes, ltc_loss
    demos = expert_demos(tok, env, seeds=range(256))            # (ids, loss_mask) chats for SFT
    batch = collate_episodes(episodes, pad_id=tok.eot_id, failed_lm_weight=1e-5)
    loss, metrics = ltc_loss(logits, head_values, batch, LossWeights(temperature=1.0))

Follows the reference code of Learning through Communication (Wang et al., arXiv 2310.01444).
Roles (minilm/agents/patterns.py): SYSTEM text gets no loss; AGENT tokens get LM, policy and value
losses; TEACHER text gets the policy loss as imitation (stored log-prob 1.0, old value 0, as the
code stores it) and the LM loss, no value loss. G is Monte-Carlo, gamma = 1, over the executed
agent turns (the terminal +-1), then tanh-squashed; A = tanh(G) - V_old, NOT whitened (opt-in
`whiten_advantages`). A VETOED turn (rejected by the teacher) is its own one-turn episode with
G = -1 (the paper's judged-wrong answer) and no LM loss. The policy ratio and entropy use the
rollouts' sampling temperature. L_LM averages over the tokens of successful episodes; failed
ones add ~1e-5 each. L = lm_coef L_LM + ppo_coef L_PPO, L_PPO = pg + vf_coef vf - ent_coef H.
Deviation from the code: its LM loss also covers system text (label masking commented out).
The pure PPO pieces come from minilm/post/ppo.py; only the returns and the loss assembly are new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minilm.agents.patterns import AGENT, TEACHER, VETOED
from minilm.post.chat import render_chat
from minilm.post.ppo import (entropy_from_logits, logprobs_from_logits, masked_mean, masked_whiten,
                             ppo_policy_loss, value_loss)


@dataclass
class LossWeights:
    lm_coef: float = 1.0            # weight of L_LM (the paper: 1)
    ppo_coef: float = 0.5           # weight of L_PPO (the paper: 0.5)
    vf_coef: float = 1.0            # value_loss already carries the 0.5 of "0.5 * MSE"
    ent_coef: float = 0.01          # entropy bonus
    clip: float = 0.2               # PPO's epsilon
    lm_agent_only: bool = False     # not the paper: LM loss on the agent's tokens only, not the teacher's
    whiten_advantages: bool = False  # not the paper: whiten A over the minibatch (then A > 0 for failures too)
    temperature: float = 1.0        # the rollouts' sampling temperature: the policy is softmax(logits / T)


VETO_RETURN = -1.0      # a vetoed turn's return: the paper's reward for a judged-wrong answer
TEACHER_OLD_LOGPROB = 1.0   # the reference code's stored log-prob for teacher text (see ltc_returns)


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


def monte_carlo_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """G_t = sum_{k >= t, on the mask} gamma^(#mask tokens between) r_k, reported on `keep`
    (default: the mask) and 0 elsewhere. (B, T).

    Tokens off the mask neither add reward nor discount, they pass the return through: time is
    counted in agent tokens, and a teacher token (on `keep`) sees the return of what follows it.
    """
    m = mask.to(rewards.dtype)
    keep = m if keep is None else keep.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        # an agent token adds its reward and discounts; any other token passes the return through
        running = torch.where(m[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running * keep[:, t]
    return out


def collate_episodes(episodes, pad_id: int, failed_lm_weight: float = 1e-5) -> dict[str, torch.Tensor]:
    """Right-pad episodes into (B, T) tensors: tokens, attention_mask, agent_mask (AGENT or VETOED:
    policy and value), teacher_mask, vetoed_mask, old_logprobs, old_values, rewards (the +-1 on
    each row's last AGENT token), and lm_weight (B,): 1 for a success, failed_lm_weight otherwise."""
    if not episodes:
        raise ValueError("collate_episodes needs at least one episode")
    b, width = len(episodes), max(len(ep.tokens) for ep in episodes)
    out = {"tokens": torch.full((b, width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((b, width), dtype=torch.long),
           "agent_mask": torch.zeros((b, width)), "teacher_mask": torch.zeros((b, width)),
           "vetoed_mask": torch.zeros((b, width)),
           "old_logprobs": torch.zeros((b, width)), "old_values": torch.zeros((b, width)),
           "rewards": torch.zeros((b, width)), "lm_weight": torch.zeros(b)}
    for i, ep in enumerate(episodes):
        n = len(ep.tokens)
        if not (len(ep.who) == len(ep.logprobs) == len(ep.values) == n):
            raise ValueError(f"episode {i}: tokens, who, logprobs and values differ in length")
        out["tokens"][i, :n] = torch.tensor(ep.tokens)
        out["attention_mask"][i, :n] = 1
        who = torch.tensor(ep.who)
        out["agent_mask"][i, :n] = ((who == AGENT) | (who == VETOED)).float()
        out["teacher_mask"][i, :n] = (who == TEACHER).float()
        out["vetoed_mask"][i, :n] = (who == VETOED).float()
        # teacher text: the code's fixed log-prob 1.0 and old value 0 (not the student's numbers)
        out["old_logprobs"][i, :n] = torch.where(who == TEACHER, TEACHER_OLD_LOGPROB, torch.tensor(ep.logprobs))
        out["old_values"][i, :n] = torch.where(who == TEACHER, 0.0, torch.tensor(ep.values))
        last = ep.last_agent_index()
        if last >= 0:
            out["rewards"][i, last] = ep.reward
        out["lm_weight"][i] = 1.0 if ep.success else failed_lm_weight
    return out


def ltc_advantages(batch: dict, w: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, advantages), (B, T), 0 off the policy tokens (agent and teacher).

    returns = tanh(G): G = the gamma = 1 return of the executed turns (the terminal +-1 on every
    AGENT token, and on the teacher tokens before it), VETO_RETURN on a vetoed turn. A = returns -
    V_old. A teacher token's ratio is p / e <= 1/e < 1 - clip, so the clipped surrogate pushes its
    probability up when A > 0 (a success) and gives no gradient when A < 0: teacher text is
    imitated from successful episodes and never unlearned from failed ones.
    """
    agent, teacher, vetoed = batch["agent_mask"], batch["teacher_mask"], batch["vetoed_mask"]
    policy = agent + teacher                                    # disjoint 0/1 masks
    executed = agent * (1 - vetoed)             # the trajectory the environment saw: vetoed turns are off it
    g = monte_carlo_returns(batch["rewards"], executed, gamma=1.0, keep=executed + teacher)
    g = torch.where(vetoed.bool(), torch.full_like(g, VETO_RETURN), g)
    returns = torch.tanh(g) * policy            # +-1 -> +-0.76, the range of V = tanh(head)
    adv = (returns - batch["old_values"]) * policy
    if w.whiten_advantages:                     # PPO habit, off: an all-failed minibatch would get A > 0
        adv = masked_whiten(adv, policy)
    return returns, adv


def ltc_loss(logits: torch.Tensor, head_values: torch.Tensor, batch: dict, w: LossWeights):
    """(L, metrics) from one forward pass: logits (B, T, V), head_values (B, T) = V after token t."""
    tokens, attn, agent = batch["tokens"], batch["attention_mask"], batch["agent_mask"]
    teacher, vetoed = batch["teacher_mask"], batch["vetoed_mask"]
    logp = logprobs_from_logits(logits, tokens, attn)                            # (B, T), the model at T = 1
    # the LM loss: executed agent tokens and teacher text that have context; never SYSTEM or VETOED
    imitated = agent * (1 - vetoed) + (0 if w.lm_agent_only else teacher)          # (B, T) 0/1
    lm_mask = (attn.long().cumsum(-1) > 1) & attn.bool() & imitated.bool()
    lm_w = batch["lm_weight"][:, None].expand_as(logp)                           # (B, T)
    # average over the tokens of successful episodes (weight 1), so imitation keeps weight lm_coef
    # whatever the success share; failed ones add their ~1e-5 terms. No success: the plain count.
    full = (lm_mask & (lm_w >= 1)).sum()
    lm = (-logp * lm_w * lm_mask).sum() / (full if full > 0 else lm_mask.sum()).clamp(min=1)
    loss, metrics = w.lm_coef * lm, {"lm_loss": lm.item()}
    if w.ppo_coef > 0:
        policy = agent + teacher
        # the policy that sampled: softmax(logits / T), as generate() recorded (greedy records T = 1)
        tempered = w.temperature > 0 and w.temperature != 1.0
        scaled = logits / w.temperature if tempered else logits
        logp_pi = logprobs_from_logits(scaled, tokens, attn) if tempered else logp
        # V(state before token t) = head at t - 1, as `action_values` shifts it
        values = torch.cat([head_values.new_zeros(head_values.shape[0], 1), head_values[:, :-1]], 1)
        returns, adv = ltc_advantages(batch, w)
        pg, _ = ppo_policy_loss(logp_pi, batch["old_logprobs"], adv, policy, clip=w.clip)
        # ratio, clipfrac, approx_kl over the agent's tokens: the teacher's 1.0 is no behaviour log-prob
        _, m_pg = ppo_policy_loss(logp_pi.detach(), batch["old_logprobs"], adv, agent, clip=w.clip)
        vf, m_vf = value_loss(values, batch["old_values"], returns, agent, clip=None)
        # the distribution that produced token t is logits[:, t - 1]: shift like the values
        ent = entropy_from_logits(scaled)
        ent = masked_mean(torch.cat([ent.new_zeros(ent.shape[0], 1), ent[:, :-1]], 1), policy)
        ppo = pg + w.vf_coef * vf - w.ent_coef * ent
        loss = loss + w.ppo_coef * ppo
        metrics.update(pg_loss=pg.item(), vf_loss=vf.item(), entropy=ent.item(), ppo_loss=ppo.item(),
                       **m_pg, **m_vf)
    return loss, metrics
