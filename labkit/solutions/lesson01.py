"""Worked solutions of lesson 01's exercises (see labkit.solutions)."""

from __future__ import annotations

import math

import torch


def wanda_mask(W, norm, sparsity):
    """W: [out, in]; norm: [in], ||X_j||_2 of each input feature over the calibration tokens.
    Returns bool [out, in], True = pruned: the round(sparsity * in) lowest scores of every row."""
    score = W.abs() * norm[None, :]  # Wanda eq. 1: S_ij = |W_ij| * ||X_j||_2
    k = round(sparsity * W.shape[1])  # pruned per row: each row is its own comparison group
    lowest = score.sort(dim=1, stable=True).indices[:, :k]  # [out, k]; ties broken in column order
    return torch.zeros_like(score, dtype=torch.bool).scatter(1, lowest, True)


def nm_mask(score, n, m):
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # [out, groups, m]: consecutive inputs of a row
    lowest = groups.argsort(dim=2)[:, :, : m - n]  # the m - n lowest of each group
    return torch.zeros_like(groups, dtype=torch.bool).scatter(2, lowest, True).reshape(rows, cols)


def bitmask_bytes(weight):
    return math.ceil(weight.numel() / 8) + int((weight != 0).sum()) * weight.element_size()
