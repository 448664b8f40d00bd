"""Worked solutions of lesson 00's exercises (see labkit.solutions)."""

from __future__ import annotations

import math

import torch


def token_nll(logits, ids):
    log_p = torch.log_softmax(logits.float(), dim=-1)  # [seqlen, vocab]
    return -log_p[:-1].gather(1, ids[1:, None]).squeeze(1)  # logits[t] predicts ids[t + 1]


def perplexity(nll):
    return math.exp(nll.double().mean().item())  # exp of the mean, not the mean of exp


def model_bytes(model):
    # model.parameters() yields a shared tensor once; model.state_dict() would list it under both names
    return sum(p.numel() * p.element_size() for p in model.parameters())
