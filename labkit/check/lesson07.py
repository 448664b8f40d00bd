"""Checks for lesson 07 (knowledge distillation): softened targets, forward KL with the τ² factor, and
the generalized Jensen-Shannon divergence of GKD.

    check.lesson07.soft_targets(my_soft_targets)
    check.lesson07.forward_kl(my_forward_kl)
    check.lesson07.jsd(my_jsd)
"""

from __future__ import annotations

import torch

from ..distill import losses
from . import Verdict, call, exercise, tensor_like

# Hand-made logits [tokens, vocab]: a peaked and a flat row, a vocabulary of 5.
_STUDENT = torch.tensor([[2.0, 0.5, -1.0, 0.0, 0.3], [0.1, 0.2, 0.0, -0.1, 0.4], [3.0, -2.0, 1.0, 0.5, 0.0]])
_TEACHER = torch.tensor([[3.0, 1.0, -2.0, 0.5, 0.0], [1.5, -0.5, 0.2, 0.0, -1.0], [0.5, 0.0, 2.5, 1.0, -1.0]])


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # KL(p ‖ q) per row: [tokens]
    return (p * (p.log() - q.log())).sum(-1)


@exercise
def soft_targets(fn) -> bool:
    """fn(logits [..., vocab], temperature) -> probabilities [..., vocab] = softmax(logits / τ)."""
    v = Verdict("soft_targets")
    for tau in (1.0, 2.0, 4.0):
        got = call(v, fn, _TEACHER.clone(), tau)
        if v.problem:
            break
        expected = torch.softmax(_TEACHER / tau, -1)
        hints = {
            "took the softmax over the tokens (dim 0) instead of over the vocabulary (the last dim)": torch.softmax(
                _TEACHER / tau, 0
            )
        }
        if tau != 1.0:  # at τ = 1 the scaling mistakes are invisible
            hints["multiplied the logits by τ instead of dividing (that sharpens the distribution)"] = torch.softmax(
                _TEACHER * tau, -1
            )
            hints["divided the probabilities by τ after the softmax (they no longer sum to 1)"] = (
                torch.softmax(_TEACHER, -1) / tau
            )
        if not tensor_like(v, got, expected, f"the soft targets at τ={tau:g}", atol=1e-6, hints=hints):
            break
    return v.report("softmax(z / τ): higher τ flattens the distribution and shows the small probabilities.")


@exercise
def forward_kl(fn) -> bool:
    """fn(student_logits [tokens, vocab], teacher_logits [tokens, vocab], temperature) -> scalar:
    τ² · mean over tokens of KL(p_T ‖ p_S), with p = softmax(logits / τ) (Hinton et al., 2015)."""
    v = Verdict("forward_kl")
    for tau in (1.0, 2.0, 5.0):
        got = call(v, fn, _STUDENT.clone(), _TEACHER.clone(), tau)
        if v.problem:
            break
        expected = losses.forward_kl(_STUDENT, _TEACHER, tau)
        p_s, p_t = torch.softmax(_STUDENT / tau, -1), torch.softmax(_TEACHER / tau, -1)
        hints = {
            "computed KL(p_S ‖ p_T), the reverse KL: the forward KL takes the expectation under the teacher, "
            "Σ p_T (log p_T − log p_S)": tau**2 * _kl(p_s, p_t).mean(),
            "summed over the tokens instead of taking the mean": tau**2 * _kl(p_t, p_s).sum(),
            "softened only the teacher: the student's logits must be divided by τ too": tau**2
            * _kl(p_t, torch.softmax(_STUDENT, -1)).mean(),
        }
        if tau != 1.0:
            hints[
                "forgot the τ² factor (Hinton et al. multiply by τ² so the gradient's size does not shrink "
                "as 1/τ² when τ grows)"
            ] = _kl(p_t, p_s).mean()
            hints["multiplied by τ instead of τ²"] = tau * _kl(p_t, p_s).mean()
        if not tensor_like(v, got, expected, f"the loss at τ={tau:g}", atol=1e-6, hints=hints):
            break
    return v.report("τ² · KL(p_T ‖ p_S), averaged over tokens: labkit.distill.forward_kl.")


@exercise
def jsd(fn) -> bool:
    """fn(student_logits [tokens, vocab], teacher_logits [tokens, vocab], beta) -> scalar: mean over tokens of
    β · KL(p_T ‖ m) + (1 − β) · KL(p_S ‖ m), m = β · p_T + (1 − β) · p_S (GKD, Agarwal et al., 2024; τ = 1)."""
    v = Verdict("jsd")
    p_s, p_t = torch.softmax(_STUDENT, -1), torch.softmax(_TEACHER, -1)
    for beta in (0.5, 0.1, 0.9):
        got = call(v, fn, _STUDENT.clone(), _TEACHER.clone(), beta)
        if v.problem:
            break
        expected = losses.jsd(_STUDENT, _TEACHER, beta)
        m = beta * p_t + (1 - beta) * p_s
        swapped = (1 - beta) * p_t + beta * p_s
        hints = {
            "mixed m with the weights swapped: m = β · p_T + (1 − β) · p_S (β weights the teacher)": (
                beta * _kl(p_t, swapped) + (1 - beta) * _kl(p_s, swapped)
            ).mean(),
            "added the two KL terms without the weights β and 1 − β": (_kl(p_t, m) + _kl(p_s, m)).mean(),
            "used KL(m ‖ p) instead of KL(p ‖ m) in the two terms": (
                beta * _kl(m, p_t) + (1 - beta) * _kl(m, p_s)
            ).mean(),
            "summed over the tokens instead of taking the mean": (beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)).sum(),
        }
        if not tensor_like(v, got, expected, f"the divergence at β={beta:g}", atol=1e-6, hints=hints):
            break
    return v.report("The generalized JSD of GKD: labkit.distill.jsd (β = 0.5 is the symmetric JSD, at most log 2).")


__all__ = ["forward_kl", "jsd", "soft_targets"]
