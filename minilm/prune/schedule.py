"""The sparsity schedule of gradual pruning, and distillation from the unpruned model (lesson 11).

    from minilm.prune.schedule import SparsitySchedule, distill_loss
    sched = SparsitySchedule(final_density=0.5, total_steps=200, warmup_steps=20, final_steps=40,
                             every=10)
    sched.density(0), sched.density(100), sched.density(199)     # 1.0, ~0.58, 0.5

Cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune", arXiv 1710.01878), in the form
movement pruning uses (Sanh et al. 2020, arXiv 2005.07683, section 4): dense for `warmup_steps`,
then the kept fraction falls as

    density(t) = d_f + (1 - d_f) * (1 - (t_q - t_w) / n)^3        t_w <= t < t_w + n

with n = total - warmup - final ramp steps and t_q = t rounded down to the cadence `every`
(Zhu & Gupta's Delta t: the density changes only every `every` steps), then `final_steps` at d_f
so the model recovers at the final sparsity. The ramp removes many neurons early, while the
network is still redundant, and few at the end.

Santacroce et al. 2023 (arXiv 2302.03773) report that the gaps between methods narrow with
knowledge distillation from the unpruned model. Deviation: their exact distillation loss is not
reproduced; `distill_loss` is the standard one of Hinton et al. 2015 (arXiv 1503.02531:
temperature-T KL on logits, scaled by T^2, mixed with the task loss by PruneConfig.distill_alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SparsitySchedule:
    final_density: float       # kept fraction at the end (1 - sparsity)
    total_steps: int
    warmup_steps: int = 0      # dense steps before pruning starts
    final_steps: int = 0       # steps held at final_density at the end
    every: int = 1             # cadence: density changes every `every` steps

    def __post_init__(self):
        if not 0.0 < self.final_density <= 1.0:
            raise ValueError(f"final_density must be in (0, 1], got {self.final_density}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1 step, got {self.every}")
        if self.warmup_steps < 0 or self.final_steps < 0 or self.ramp_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} + final_steps={self.final_steps} leave no "
                             f"ramp in total_steps={self.total_steps}; lower them or raise --max-steps")

    @property
    def ramp_steps(self) -> int:
        return self.total_steps - self.warmup_steps - self.final_steps

    def density(self, step: int) -> float:
        """Kept fraction of FFN neurons at 0-based `step`."""
        if step < self.warmup_steps:
            return 1.0
        if step >= self.warmup_steps + self.ramp_steps:
            return self.final_density
        t_q = (step - self.warmup_steps) // self.every * self.every   # steps into the ramp, on the cadence
        progress = t_q / self.ramp_steps
        return self.final_density + (1.0 - self.final_density) * (1.0 - progress) ** 3


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor,
                 temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the positions where `valid` (B, T) is True.

    Logits are (B, T, V); softening both by T exposes the teacher's ranking of wrong tokens, and
    the T^2 keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)                    # (B, T)
    valid = valid.float()
    return (kl * valid).sum() / valid.sum().clamp(min=1) * temperature ** 2
