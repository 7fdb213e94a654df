"""PPO's four models held four ways: full PPO, LoRA-PPO, Hydra-PPO and J-Hydra-PPO.

    models = build_models("hydra", cfg, reward=hydra_sft_model)     # or "ppo"/"lora" with sft=...
    with models.sampler() as policy: rollout = generate(policy, prompts, ...)
    logits, values = models.policy_and_values(tokens, attention_mask)   # with gradients
    ref_logits = models.reference_logits(tokens, attention_mask)        # call under no_grad
    scores = models.score(tokens, attention_mask)                       # (B,), under no_grad

Hydra-RLHF (Santacroce et al. 2023, arXiv 2309.00754; ../shared/papers/hydra_rlhf.md) compares:
  ppo     four full models: actor (from SFT, trained), reference (SFT, frozen), critic (from the
          reward model, trained, value head initialised from the reward head), reward (frozen);
  lora    the same four models, but actor and critic are frozen bases + LoRA (adapters "actor",
          "critic"); only the adapters and the value head train;
  hydra   ONE Hydra-SFT model (LM head + reward head, minilm/post/heads.py) with two LoRA sets:
          "actor" drives the LM head, "critic" drives a value head; the reference and the reward
          are the same weights with LoRA switched off ("dynamic LoRA"), so one base is in memory;
  jhydra  one Hydra base with ONE joint LoRA set: one forward gives logits and values, and the
          policy and value losses backpropagate into the same adapter.
What the paper's text says, as far as we could check it (the abstract, and Tables 1-2 as quoted
in a summary verified against the PDF; the body text itself was not available to us):
  Table 2 counts static models / LoRA sets: PPO 4 / 0, LoRA-PPO 4 / 2, J-Hydra-PPO 1 / 1,
  Hydra-PPO 1 / 2 (and a fifth configuration with 2 / 2). So LoRA-PPO does keep separate frozen
  reference and reward models (4 static models), and "dynamic LoRA" is what Hydra adds; Hydra-PPO
  has one base with an actor LoRA set and a critic LoRA set; J-Hydra-PPO one base with one set.
  Table 1 (LLaMA-7B, StackExchange; memory / latency per sample; the batch size of each run is not
  in our source): PPO 220 GB (an estimate, no latency), LoRA-PPO 68.0 GB / 18.75 s, Hydra-PPO 71.1 GB / 6.47 s, J-Hydra-PPO 67.9 GB / 5.01 s;
  1 - 6.47 / 18.75 = 65% is the abstract's "latency per sample down by up to 65%".
Choices that the available text does NOT settle (ours, stated): the value head is a separate
Linear(d_model, 1) copied from the reward head (d_model + 1 parameters, not a "static model"), so
that "LoRA off" keeps returning the frozen reward while the critic learns; in full PPO and LoRA-PPO
the critic starts from the reward model (as DeepSpeed-Chat, on which the paper builds, does). How
the paper initialises the critic's head in Hydra-PPO we could not read; if it trains the reward
head itself, "LoRA off" would no longer be the frozen reward, so a separate head is the reading
consistent with dynamic LoRA.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch.nn as nn

from minilm import MinilmError
from minilm.lora import lora_disabled, use_adapters
from minilm.post.base_model import PostConfig, add_lora
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


def build_models(variant: str, cfg: PostConfig, reward, sft=None) -> nn.Module:
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
            add_lora(cfg, sft, adapter="actor")          # freezes the actor's base
            add_lora(cfg, critic.lm, adapter="critic")   # freezes the critic's trunk; the value head trains
        return SeparateModels(sft, critic, reference, reward)
    _copy_reward_head_to_value(reward)
    if variant == "jhydra":
        add_lora(cfg, reward.lm, adapter="joint")
    else:
        add_lora(cfg, reward.lm, adapter="actor")
        add_lora(cfg, reward.lm, adapter="critic")
    return HydraModels(reward, joint=variant == "jhydra")
