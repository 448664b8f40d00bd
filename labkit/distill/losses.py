"""Distillation losses: how far the student's next-token distribution is from the teacher's.

Every loss takes logits shaped [..., vocab] (any leading dims, e.g. [batch, seqlen]), computes a
divergence per token, and returns its mean over the tokens selected by an optional `mask`
(shaped like the leading dims; True/1 = counted). Computed in fp32 whatever the logits' dtype.

    forward_kl   KL(p_T ‖ p_S) · τ²          Hinton et al. (2015): "mode-covering", the student
                                              must put mass wherever the teacher does
    reverse_kl   KL(p_S ‖ p_T) · τ²          MiniLLM (Gu et al., 2024): "mode-seeking", the student
                                              may ignore teacher modes it cannot represent
    jsd          generalized JSD(β) · τ²     GKD (Agarwal et al., 2024), interpolates between the two
    hidden_mse   mean (h_S − h_T)²           on hidden states: block-wise / feature distillation

p = softmax(logits / τ). Softening with τ > 1 exposes the teacher's "dark knowledge" (the
relative probabilities of wrong tokens); the gradient of a divergence of softened
distributions shrinks as 1/τ², so Hinton et al. multiply by τ² to keep its size independent
of τ (and comparable with a hard-label cross-entropy). All three divergences here are scaled
by τ², so at τ = 1 they are the plain divergences.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.nn import functional as F

# Outside this range fp32 logits / τ overflow (τ → 0) or τ² does (τ → ∞): the loss would be NaN.
TEMPERATURE_RANGE = (1e-6, 1e4)


def check_temperature(temperature) -> float:
    low, high = TEMPERATURE_RANGE
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not low <= temperature <= high  # NaN compares False: refused too
    ):
        raise ValueError(
            f"temperature={temperature!r}: need a number in [{low:g}, {high:g}] (1.0 = the model's own "
            f"distribution; Hinton et al. soften with 2 to 20; near 0 it approaches greedy decoding)."
        )
    return float(temperature)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 1:
        raise ValueError(
            f"beta={beta!r}: the generalized JSD needs 0 < beta < 1 (its limits are the KLs: "
            f"use forward_kl for beta -> 0 and reverse_kl for beta -> 1)."
        )
    return float(beta)


def _check_float_tensor(value, name: str, shape: str) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 1 or value.shape[-1] < 1:
        got = (
            f"shape {tuple(value.shape)}, dtype {value.dtype}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise ValueError(f"{name} must be a float tensor {shape}; got {got}.")


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Float tensors [..., vocab] with the same vocabulary (last dim) and the same leading dims."""
    _check_float_tensor(student, "student_logits", "[..., vocab]")
    _check_float_tensor(teacher, "teacher_logits", "[..., vocab]")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: student logits have {student.shape[-1]} entries per token, "
            f"teacher logits {teacher.shape[-1]}. Distillation on logits needs the same tokenizer "
            f"and vocabulary for both models."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            f"cover different tokens: run both models on the same token ids."
        )


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per_token [...] over the positions where mask [...] is nonzero (all when mask is None)."""
    if mask is None:
        return per_token.mean()
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise ValueError(f"mask must be a bool or 0/1 tensor [...] or None; got {type(mask).__name__}.")
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the logits' leading shape {tuple(per_token.shape)}.")
    mask = mask.to(per_token.device, per_token.dtype)
    count = mask.sum()
    if count == 0:
        raise ValueError("mask selects no tokens: nothing to average over.")
    return (per_token * mask).sum() / count


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) over the last dim, with 0 · log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_probs(student_logits, teacher_logits, temperature):
    check_logits(student_logits, teacher_logits)
    tau = check_temperature(temperature)
    log_ps = F.log_softmax(student_logits.float() / tau, dim=-1)  # [..., vocab]
    log_pt = F.log_softmax(teacher_logits.float() / tau, dim=-1)  # [..., vocab]
    return log_ps, log_pt, tau


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """τ² · KL(p_T ‖ p_S), the knowledge-distillation loss of Hinton et al. (2015), mean over tokens.

    student_logits, teacher_logits: [..., vocab]; mask: [...] or None. Returns a scalar.
    Gradient with respect to the student's logits: τ · (p_S − p_T) per token (before the mean).
    """
    log_ps, log_pt, tau = _log_probs(student_logits, teacher_logits, temperature)
    return masked_mean(_kl(log_pt, log_ps), mask) * tau**2


def at_temperature(loss, temperature: float):
    """A divergence for distill(loss=...) from your own loss(student_logits, teacher_logits, temperature)
    -> scalar (lesson 07's "build it"), called on [batch, seqlen - 1, vocab] logits at `temperature`.
    It has no mask, so it cannot serve on-policy distillation (which masks the prompt): ValueError."""
    if not callable(loss):
        raise ValueError(f"loss={loss!r}: pass a function loss(student_logits, teacher_logits, temperature).")
    tau = check_temperature(temperature)

    def divergence(student_logits, teacher_logits, mask=None):
        if mask is not None:
            raise ValueError(
                "this loss(student_logits, teacher_logits, temperature) takes no mask, and on_policy=True masks "
                "the prompt's tokens: use loss='forward_kl' (or a callable with a mask= argument) there."
            )
        return loss(student_logits, teacher_logits, tau)

    return divergence


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """τ² · KL(p_S ‖ p_T), mean over tokens (the expectation is under the student's own distribution)."""
    log_ps, log_pt, tau = _log_probs(student_logits, teacher_logits, temperature)
    return masked_mean(_kl(log_ps, log_pt), mask) * tau**2


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """τ² · generalized Jensen–Shannon divergence of GKD (Agarwal et al., 2024), mean over tokens.

        JSD(β) = β · KL(p_T ‖ m) + (1 − β) · KL(p_S ‖ m),     m = β · p_T + (1 − β) · p_S

    This is the paper's D_JSD(β)(P ‖ Q) with P = p_T (teacher) and Q = p_S (student), the same
    convention as TRL's GKDTrainer. β = 0.5 is the symmetric Jensen–Shannon divergence (at most
    log 2). At the ends the divergence itself vanishes (m becomes p_S or p_T), but scaled it
    tends to the KLs: JSD(β)/β → KL(p_T ‖ p_S) (forward) as β → 0, and JSD(β)/(1 − β) →
    KL(p_S ‖ p_T) (reverse) as β → 1. So pass beta in (0, 1); use forward_kl / reverse_kl for
    the limits.
    """
    beta = check_beta(beta)
    log_ps, log_pt, tau = _log_probs(student_logits, teacher_logits, temperature)
    # log m = log(β p_T + (1 − β) p_S), computed stably in log space
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
    per_token = beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)
    return masked_mean(per_token, mask) * tau**2


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of the mean squared error over features: mean_t (1/d) ‖h_S,t − h_T,t‖².

    student_hidden, teacher_hidden: [..., hidden]; mask: [...] or None. Returns a scalar.
    """
    _check_float_tensor(student_hidden, "student_hidden", "[..., hidden]")
    _check_float_tensor(teacher_hidden, "teacher_hidden", "[..., hidden]")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(student_hidden.shape)}, teacher "
            f"{tuple(teacher_hidden.shape)}; block-wise distillation needs matching hidden sizes."
        )
    per_token = ((student_hidden.float() - teacher_hidden.float()) ** 2).mean(-1)
    return masked_mean(per_token, mask)


LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}

__all__ = [
    "LOSSES",
    "check_beta",
    "check_logits",
    "check_temperature",
    "forward_kl",
    "hidden_mse",
    "jsd",
    "masked_mean",
    "reverse_kl",
]
