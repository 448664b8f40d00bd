"""Worked solutions of lesson 03's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def unit_scores(var, W, unit):
    score = var * W.pow(2).sum(0)  # S_j = Var(x_j) · ||W[:, j]||², FLaP's fluctuation (WIFV)
    z = (score - score.mean()) / score.std()  # standardized over the layer's channels
    return z.view(-1, unit).mean(1)  # the mean z of each unit's consecutive channels


def kv_group_columns(g, n_heads, n_kv_heads, head_dim):
    group = n_heads // n_kv_heads
    return torch.arange(g * group * head_dim, (g + 1) * group * head_dim)


def compensation_bias(W, x, removed):
    return W[:, removed] @ x[:, removed].mean(0)
