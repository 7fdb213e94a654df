"""Hydra heads: one Phi-3 trunk carrying the LM head and any number of scalar heads.

    hydra = HydraModel(lm, heads=("reward",))
    logits, lm_loss, values = hydra(idx, attention_mask, targets)   # ONE trunk pass
    values["reward"]                                                  # (B, T): a scalar per position
    scores = hydra.score(idx, attention_mask)                         # (B,): at each last real token

Hydra-RLHF (Chaudhari et al. 2023, arXiv 2309.00754, "Hydra-SFT") trains a causal-LM
head and a reward head on the same trunk at once, so later stages need one base model where
plain RLHF holds separate policy and reward models. A scalar head is `Linear(d_model, 1)` on
the trunk's final-norm hidden state (`Phi3.hidden`); a sequence's score is the head's value at its
last non-pad token, the one position that has read the whole prompt and response.

The heads live in `hydra.heads` (an `nn.ModuleDict`), outside the Phi3 module, so `hydra.lm` still
saves, loads and exports as a plain Phi-3 checkpoint; stages store the heads with
`save_checkpoint(..., extra={"heads": hydra.heads.state_dict()})`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minilm import ops


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token (B,), for left or right padding alike."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row of attention_mask has no real token; every sequence needs at least one")
    t = mask.shape[1]
    # argmax returns the first maximum, so on the flipped mask it finds the last 1
    return t - 1 - mask.flip(1).long().argmax(dim=1)


class HydraModel(nn.Module):
    """A causal LM (`Phi3`) plus named scalar heads reading the same hidden states."""

    def __init__(self, lm: nn.Module, heads=("reward",)):
        super().__init__()
        if isinstance(heads, str):
            heads = (heads,)
        if not heads:
            raise ValueError("HydraModel needs at least one head name, e.g. heads=('reward',)")
        self.lm = lm
        d_model = lm.config.d_model
        self.heads = nn.ModuleDict({name: nn.Linear(d_model, 1) for name in heads})
        for head in self.heads.values():
            # small weights: every score starts near 0, so Bradley-Terry starts at log 2
            nn.init.normal_(head.weight, std=0.02 / d_model ** 0.5)
            nn.init.zeros_(head.bias)
        self.heads.to(next(lm.parameters()).device)

    @property
    def config(self):
        return self.lm.config

    def head_values(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """{head: (B, T)} scalar values from hidden states (B, T, d_model), in float32."""
        return {name: head(hidden).squeeze(-1).float() for name, head in self.heads.items()}

    def forward(self, idx, attention_mask=None, targets=None):
        """(logits (B, T, V), LM loss or None, {head: values (B, T)}) from one trunk pass.

        targets (B, T) use -100 for positions without an LM loss, as `Phi3.forward` does.
        """
        hidden = self.lm.hidden(idx, attention_mask=attention_mask)  # (B, T, d_model)
        logits = self.lm.lm_head(hidden)                             # (B, T, V)
        loss = None
        if targets is not None:
            loss = ops.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss, self.head_values(hidden)

    def score(self, idx, attention_mask=None, head: str = "reward") -> torch.Tensor:
        """Head value at each row's last real token (B,); skips the LM head's matmul."""
        if head not in self.heads:
            raise ValueError(f"no head {head!r}; this model has {sorted(self.heads)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        hidden = self.lm.hidden(idx, attention_mask=attention_mask)
        values = self.heads[head](hidden).squeeze(-1).float()        # (B, T)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
