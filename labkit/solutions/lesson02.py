"""Worked solutions of lesson 02's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def obs_block(W1, Hinv1, constrain):
    """W1: [rows, B], a block of columns; Hinv1: [B, B], the block of the upper Cholesky factor of H^-1;
    constrain(i, W1) -> [rows]: column i of the block, as updated so far, with its constraint applied
    (pruned weights set to 0; in lesson 05, rounded to the grid). Returns (Q1, Err1, Losses1), each [rows, B]."""
    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):  # one column at a time, in order
        w, d = W1[:, i], Hinv1[i, i]
        q = constrain(i, W1)  # column i with the updates of the columns before it, constrained
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d**2
        err = (w - q) / d  # the change, scaled by [H^-1]_ii (the OBS update, eq. 3)
        W1[:, i:] -= err[:, None].matmul(Hinv1[i, i:][None, :])  # spread over the columns not yet done
        Err1[:, i] = err  # kept for the lazy update of the columns after the block
    return Q1, Err1, Losses1


def obs_error(w, H):
    return w**2 / (2 * torch.linalg.inv(H).diagonal())  # [H^-1]_qq, not 1 / H_qq


def obs_update(w, H, q):
    Hinv = torch.linalg.inv(H)
    return w - w[q] / Hinv[q, q] * Hinv[:, q]


def output_error(W, W_hat, H):
    dW = W - W_hat
    return (torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T)).item()
