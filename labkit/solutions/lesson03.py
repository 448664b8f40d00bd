"""Worked solutions of lesson 03's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def fluctuation_score(x, W):
    return x.var(0, unbiased=False) * W.pow(2).sum(0)


def kv_group_columns(g, n_heads, n_kv_heads, head_dim):
    group = n_heads // n_kv_heads
    return torch.arange(g * group * head_dim, (g + 1) * group * head_dim)


def compensation_bias(W, x, removed):
    return W[:, removed] @ x[:, removed].mean(0)
