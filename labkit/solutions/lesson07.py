"""Worked solutions of lesson 07's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def forward_kl(student_logits, teacher_logits, temperature):
    """student_logits, teacher_logits: [..., vocab]. Returns a scalar: tau^2 * mean over tokens of
    KL(p_T || p_S), both distributions softened by the temperature tau (Hinton et al., 2015)."""
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # fp32, as the losses are
    log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_t = log_p_t.exp()
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(-1)  # per token; 0 log 0 = 0
    return kl.mean() * temperature**2  # tau^2: the gradient's size does not shrink as 1 / tau^2


def soft_targets(logits, temperature):
    return torch.softmax(logits / temperature, dim=-1)  # divide the logits, then normalise


def jsd(student_logits, teacher_logits, beta):
    p_s, p_t = torch.softmax(student_logits, -1), torch.softmax(teacher_logits, -1)
    m = beta * p_t + (1 - beta) * p_s

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    return (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()
