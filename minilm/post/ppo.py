"""PPO for RLHF, the math: per-token KL penalty, reward shaping, GAE, clipped losses, KL control.

    kl = kl_penalty(logprobs, ref_logprobs, gen_mask)                     # (B, T), k1 per token
    rewards = shape_rewards(scores, kl, gen_mask, beta=kl_ctl.value)      # (B, T)
    adv, returns = gae(rewards, values, gen_mask, gamma=1.0, lam=0.95)    # (B, T), (B, T)
    pg_loss, m = ppo_policy_loss(new_logprobs, logprobs, masked_whiten(adv, gen_mask), gen_mask, clip=0.2)

Every function is pure (tensors in, tensors out); the stage that calls them is minilm/stages/ppo.py.
All per-token tensors are (B, T), aligned with a `minilm.generate.Rollout`: column t is the t-th
token of prompt + response, `mask` is its `gen_mask` (1 on generated tokens, the stop token
included). logprobs[:, t] = log pi(token t | tokens before t); values[:, t] = V(state before
token t), the value head read at column t - 1 (`action_values`), so both belong to one action.

The standard RLHF PPO of Ziegler et al. 2019 (arXiv 1909.08593) / InstructGPT (arXiv 2203.02155)
as DeepSpeed-Chat implements it, which Hydra-RLHF (arXiv 2309.00754) builds on: r_t = -beta *
KL_t on every generated token plus the sequence score on the last; GAE (arXiv 1506.02438);
whitened advantages; the clipped surrogate and PPO2's clipped value loss (arXiv 1707.06347).
Choices and deviations:
- KL estimator k1 = log pi - log pi_ref by default (unbiased, can be negative); k2 and k3 on request.
- Losses average over every generated token of the minibatch (token-level mean, as DeepSpeed-Chat),
  not per sequence first, so long responses weigh more.
- Whitening divides by the population std (TRL applies Bessel's correction).
- The adaptive KL controller is Ziegler et al.'s, with the error clipped to +-0.2.
"""

from __future__ import annotations

import torch


def _check_same_shape(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"these tensors must have the same (B, T) shape, got {shapes}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over everything (dim=None, a scalar) or along `dim`.

    x, mask: same shape; mask is 0/1 (bool, int or float). Along a dim, a row with no masked
    entry gives 0; over everything, an all-zero mask is an error (a batch with nothing to learn).
    """
    mask = mask.to(x.dtype)
    if dim is None:
        total = mask.sum()
        if total == 0:
            raise ValueError("masked_mean: the mask selects no element (no generated tokens in the batch?)")
        return (x * mask).sum() / total
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of x over the masked elements: mean((x - mean)^2) (a scalar)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the masked elements; 0 outside the mask.

    With shift_mean=False the mean is added back (only the scale changes), as TRL does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, (B, T), 0 outside the mask.

    With d = log pi(a_t) - log pi_ref(a_t) (a_t sampled from pi):
      k1 = d                      unbiased, can be negative (InstructGPT / DeepSpeed-Chat; default)
      k2 = d^2 / 2                biased, never negative, low variance
      k3 = exp(-d) - 1 + d        = (r - 1) - log r with r = pi_ref / pi: unbiased and never negative
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    d = logprobs - ref_logprobs
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d ** 2
    elif kind == "k3":
        kl = torch.expm1(-d) + d
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; use 'k1', 'k2' or 'k3'")
    return kl * mask.to(kl.dtype)


def last_generated_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last generated token (B,); every row needs at least one."""
    m = mask.bool()
    if not m.any(dim=1).all():
        raise ValueError("a row of the generation mask is empty; every response needs at least one token")
    return m.shape[1] - 1 - m.flip(1).long().argmax(dim=1)     # argmax finds the first 1 of the flipped row


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                  score_clip: float | None = None) -> torch.Tensor:
    """Per-token rewards (B, T): r_t = -beta * KL_t on generated tokens, + score on each row's last one.

    scores: (B,) sequence rewards (reward model or oracle); kl: (B, T) from `kl_penalty`.
    score_clip clamps scores to [-score_clip, score_clip] first (DeepSpeed-Chat uses 5).
    """
    _check_same_shape(kl=kl, mask=mask)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores must be (B,) = ({kl.shape[0]},), got {tuple(scores.shape)}")
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    rewards = -beta * kl * mask.to(kl.dtype)                               # (B, T)
    last = last_generated_index(mask)                                      # (B,)
    rewards[torch.arange(kl.shape[0]), last] += scores.to(rewards.dtype)   # the score lands once per row
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the generated tokens: (advantages, returns), (B, T) each.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}          (backwards in t)
        R_t     = A_t + V_t                                           (the value target)

    m is the generation mask: the episode ends after a row's last generated token (V after it
    is 0), so right padding after a stop token contributes nothing, and both outputs are 0
    outside the mask. The generated tokens of a row must be contiguous (as in a Rollout).
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    m = mask.to(values.dtype)
    values = values.detach() * m             # V = 0 on the prompt and after the stop: nothing to bootstrap
    b, t_len = rewards.shape
    advantages = torch.zeros_like(values)
    running = values.new_zeros(b)            # A_{t+1}
    next_value = values.new_zeros(b)         # V_{t+1} * m_{t+1}
    next_mask = values.new_zeros(b)          # m_{t+1}
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * m[:, t]   # reset to 0 outside the reply
        advantages[:, t] = running
        next_value, next_mask = values[:, t], m[:, t]
    return advantages, (advantages + values) * m


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (PPO eq. 7), negated to minimise, averaged over the masked tokens.

        ratio_t = exp(logp_t - old_logp_t)
        loss    = mean_t max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - clip, 1 + clip))

    All inputs (B, T); old_logprobs and advantages are constants (detached here).
    metrics: clipfrac (share of tokens where the clipped term is the larger, so the gradient is 0),
    approx_kl = mean (logp - old)^2 / 2 (k2 of KL(old || new)), ratio (mean ratio).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (PPO's epsilon, typically 0.2), got {clip}")
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)             # exactly 1 on the first minibatch after the rollout
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)   # max of the negated = min of the surrogates
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                   "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
                   "ratio": masked_mean(ratio, mask).item()}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO2's clipped value loss, averaged over the masked tokens.

        v_clip = old_V + clamp(V - old_V, -clip, clip)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (v_clip_t - R_t)^2)

    All inputs (B, T); old_values and returns are constants. clip=None: plain 0.5 * MSE.
    metrics: vf_clipfrac (share of tokens where the clipped error is the larger), value (mean V),
    explained_variance = 1 - var(R - V) / var(R) (1 perfect, 0 no better than the mean, < 0 worse),
    and 0 when the returns are constant (var(R) below 1e-8, e.g. every episode failed: a float32
    mean of equal numbers leaves a variance of ~1e-15, which would blow the ratio up to -1e11).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    old_values, returns = old_values.detach(), returns.detach()
    err = (values - returns) ** 2
    if clip is None:
        per_token, clipped_err = err, err
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        clipped_err = (v_clip - returns) ** 2
        per_token = torch.maximum(err, clipped_err)
    loss = 0.5 * masked_mean(per_token, mask)
    with torch.no_grad():
        var_r = masked_var(returns, mask)
        metrics = {"vf_clipfrac": masked_mean((clipped_err > err).float(), mask).item(),
                   "value": masked_mean(values, mask).item(),
                   "explained_variance": (1 - masked_var(returns - values, mask) / var_r).item()
                   if var_r > 1e-8 else 0.0}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T).

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v      (p = softmax(z))
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(tokens[:, t] | before) from logits (B, T, V), exactly as `token_logprobs`.

    For the update step, where the same forward pass also gives values and entropy.
    """
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)          # predicts t + 1
    picked = torch.cat([picked.new_zeros(tokens.shape[0], 1), picked], dim=1)   # (B, T): column 0 has no context
    has_context = attention_mask.long().cumsum(-1) > 1     # a row's first real token has nothing before it
    return picked * (has_context & attention_mask.bool())


def scaled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, T) log-probs, (B, T, V) logits), both at the sampling temperature: the log-probs of the
    distribution a rollout sampled from (greedy, temperature 0, records temperature-1 ones)."""
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    return logprobs_from_logits(logits, tokens, attention_mask), logits


def action_values(head_values: torch.Tensor) -> torch.Tensor:
    """Shift a value head's output (B, T) so [:, t] is V(state before token t) = head[:, t - 1]."""
    return torch.cat([head_values.new_zeros(head_values.shape[0], 1), head_values[:, :-1]], dim=1)


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 (sec. 2.2): move beta so the measured KL tracks a target.

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    current_kl: the batch's mean KL per sequence; n_steps: samples in the batch. KL above the
    target raises beta (a stronger pull to the reference), below lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not (init_kl_coef > 0 and target > 0 and horizon > 0):
            raise ValueError(f"adaptive KL needs init_kl_coef, target and horizon > 0, got "
                             f"{init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(cfg):
    """beta's controller from a config's kl_coef, kl_target (> 0: adaptive) and kl_horizon."""
    if cfg.kl_target > 0:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)
