"""PPO's four models held four ways: full PPO, LoRA-PPO, Hydra-PPO and J-Hydra-PPO (lesson 08).

    models = build_models("hydra", cfg.lora, reward=hydra_sft_model)     # or "ppo"/"lora" with sft=...
    with models.sampler() as policy: rollout = generate(policy, prompts, ...)
    logits, values = models.policy_and_values(tokens, attention_mask)   # with gradients
    ref_logits = models.reference_logits(tokens, attention_mask)        # call under no_grad
    scores = models.score(tokens, attention_mask)        # (B,) at each last real token, under no_grad
    scores = reply_scores(models, rollout, TurnClose.of(tok), pad_id, 1.0)   # (B,) what PPO rewards
    scores = oracle_score_fn(tok, oracle, convs)(rollout)     # (B,) a known reward instead (--reward oracle)

Hydra-RLHF (Santacroce et al. 2023, arXiv 2309.00754, Table 2) compares:
  ppo     four full models: actor (from SFT, trained), reference (SFT, frozen), critic (from the
          reward model, trained, value head initialised from the reward head), reward (frozen);
  lora    the same four, but actor and critic are frozen bases + LoRA ("actor", "critic");
  hydra   ONE Hydra-SFT model (LM head + reward head) with two LoRA sets: "actor" drives the LM
          head, "critic" a value head; reference and reward are the same weights with LoRA
          switched off ("dynamic LoRA"), so one base is in memory;
  jhydra  one Hydra base with ONE joint LoRA set: one forward gives logits and values.

Our choice where the paper's text we could read is silent: the value head is a separate
Linear(d_model, 1) copied from the reward head, so that "LoRA off" keeps returning the frozen
reward while the critic learns (lesson 08 gives the reasoning). `reply_scores` reads the reward
where it was trained: on the "\\n" after <|end|> (render_chat), never on a rollout's last token.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn as nn

from minilm import MinilmError
from minilm.lora import lora_disabled, use_adapters
from minilm.post.base_model import LoRAConfig, add_lora
from minilm.post.chat import TurnClose, close_replies, parse_reply
from minilm.post.ppo import action_values

VARIANTS = ("ppo", "lora", "hydra", "jhydra")


def _copy_reward_head_to_value(hydra) -> None:
    """hydra.heads["value"] := a trainable copy of the frozen reward head."""
    if "reward" not in hydra.heads:
        raise MinilmError(f"the reward model has heads {sorted(hydra.heads)}; PPO needs a 'reward' head "
                          f"(train one with `minilm reward`)")
    hydra.heads["value"] = copy.deepcopy(hydra.heads["reward"]).requires_grad_(True)
    hydra.heads["reward"].requires_grad_(False)


class SeparateModels(nn.Module):
    """ppo and lora: actor (Phi3), critic (HydraModel with a value head), reference, reward."""

    def __init__(self, actor, critic, reference, reward):
        super().__init__()
        self.actor, self.critic, self.reference, self.reward = actor, critic, reference, reward

    def sampler(self):
        return nullcontext(self.actor)

    def policy_and_values(self, tokens, attention_mask):
        """(logits (B, T, V), values (B, T) aligned with actions) with gradients."""
        logits = self.actor(tokens, attention_mask=attention_mask)[0]
        hidden = self.critic.lm.hidden(tokens, attention_mask=attention_mask)
        return logits, action_values(self.critic.heads["value"](hidden).squeeze(-1).float())

    def reference_logits(self, tokens, attention_mask):
        return self.reference(tokens, attention_mask=attention_mask)[0]

    def score(self, tokens, attention_mask):
        return self.reward.score(tokens, attention_mask, head="reward")

    def policy_model(self):
        return self.actor


class HydraModels(nn.Module):
    """hydra and jhydra: one HydraModel; adapters pick actor / critic, LoRA off gives reference and reward."""

    def __init__(self, hydra, joint: bool):
        super().__init__()
        self.hydra, self.joint = hydra, joint
        self.actor_adapter, self.critic_adapter = ("joint", "joint") if joint else ("actor", "critic")

    def sampler(self):
        return use_adapters(self.hydra.lm, self.actor_adapter)

    def policy_and_values(self, tokens, attention_mask):
        lm = self.hydra.lm
        if self.joint:  # one trunk pass gives both
            with use_adapters(lm, "joint"):
                logits, _, heads = self.hydra(tokens, attention_mask=attention_mask)
            return logits, action_values(heads["value"])
        with use_adapters(lm, "actor"):
            logits = lm(tokens, attention_mask=attention_mask)[0]
        with use_adapters(lm, "critic"):
            hidden = lm.hidden(tokens, attention_mask=attention_mask)
        return logits, action_values(self.hydra.heads["value"](hidden).squeeze(-1).float())

    def reference_logits(self, tokens, attention_mask):
        with lora_disabled(self.hydra.lm):
            return self.hydra.lm(tokens, attention_mask=attention_mask)[0]

    def score(self, tokens, attention_mask):
        with lora_disabled(self.hydra.lm):
            return self.hydra.score(tokens, attention_mask, head="reward")

    def policy_model(self):
        return self.hydra.lm


@torch.no_grad()
def reply_scores(models, rollout, close: TurnClose | None, pad_id: int, missing_end_penalty: float) -> torch.Tensor:
    """(B,) the reward role's score of each reply of a Rollout, read where the reward was trained.

    The reward head learnt on render_chat's turns, read at their last token: the "\\n" after
    <|end|>. A rollout row ends on <|end|>, or mid-reply when cut at the budget, so each reply is
    closed as render_chat closes it (`close_replies`) and read on that "\\n". A reply that did not
    end gets the same reading minus missing_end_penalty (as TRL's missing-EOS penalty): the reward
    model never saw an unended reply, so only the penalty tells the policy that stopping matters.
    """
    if close is None:
        raise MinilmError("scoring with the reward model needs close=TurnClose.of(tokenizer): the ids that "
                          "close a turn, so the reward is read where it was trained")
    tokens, attention, ended = close_replies(rollout, close, pad_id)    # (B, T'), (B, T'), (B,)
    return models.score(tokens, attention).float() - missing_end_penalty * (~ended).float()


def oracle_score_fn(tokenizer, oracle, conversations):
    """score_fn(rollout) -> (B,): the oracle's reward of each parsed reply (row i answers conversation i),
    for `--reward oracle`: PPO against a known reward."""
    def score(rollout):
        out = []
        for conv, ids in zip(conversations, rollout.responses()):
            text, ended = parse_reply(tokenizer, ids)
            out.append(oracle.reward(conv["messages"][:-1], text, ended=ended))
        return torch.tensor(out, device=rollout.tokens.device)
    return score


def build_models(variant: str, lora_cfg: LoRAConfig, reward, sft=None) -> nn.Module:
    """The four roles for `variant`. reward: a HydraModel with a trained "reward" head; sft: the
    SFT Phi3 (ppo, lora). For hydra/jhydra `reward` must be a Hydra-SFT model and sft is unused.
    The given models are used in place (the actor IS `sft`); copies are made where a role needs one."""
    if variant not in VARIANTS:
        raise MinilmError(f"unknown PPO variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in ("ppo", "lora"):
        if sft is None:
            raise MinilmError(f"variant {variant!r} needs the SFT model as well as the reward model")
        reference = copy.deepcopy(sft).requires_grad_(False).eval()
        critic = copy.deepcopy(reward)
        reward.requires_grad_(False).eval()
        _copy_reward_head_to_value(critic)
        sft.requires_grad_(True)
        critic.lm.requires_grad_(True)
        if variant == "lora":
            add_lora(lora_cfg, sft, adapter="actor")          # freezes the actor's base
            add_lora(lora_cfg, critic.lm, adapter="critic")   # freezes the critic's trunk; the value head trains
        return SeparateModels(sft, critic, reference, reward)
    _copy_reward_head_to_value(reward)
    if variant == "jhydra":
        add_lora(lora_cfg, reward.lm, adapter="joint")
    else:
        add_lora(lora_cfg, reward.lm, adapter="actor")
        add_lora(lora_cfg, reward.lm, adapter="critic")
    return HydraModels(reward, joint=variant == "jhydra")
