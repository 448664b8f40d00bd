"""Worked solutions of lesson 05's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def gptq_block(W1, Hinv1, quantize):
    """W1: [rows, B], the block's weights; Hinv1: [B, B], the block of the upper Cholesky factor of H^-1;
    quantize(i, W1) -> [rows]: column i of the block, as updated so far, on its group's grid.
    Returns (Q1, Err1, Losses1), each [rows, B]: GPTQ's Algorithm 1 over one block."""
    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):  # one column at a time, in order
        w, d = W1[:, i], Hinv1[i, i]
        q = quantize(i, W1)  # round column i (with the updates of the columns before it) to its grid
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d**2
        err = (w - q) / d  # the error, scaled by [H^-1]_ii (eq. 2)
        W1[:, i:] -= err[:, None].matmul(Hinv1[i, i:][None, :])  # spread it over the columns not yet quantized
        Err1[:, i] = err  # kept for the lazy update of the columns after the block
    return Q1, Err1, Losses1


def hessian(X):  # X: [tokens, in]
    return 2 * X.T @ X / X.shape[0]  # [in, in]; walk.Hessian does the same, summing over batches


def obq_update(W, H, q, wq_hat):  # W: [rows, in], H: [in, in], wq_hat: [rows]
    Hinv = torch.linalg.inv(H)
    err = (W[:, q] - wq_hat) / Hinv[q, q]  # [rows]: each row's error, scaled (eq. 2)
    return W - err[:, None] * Hinv[q][None, :]  # column q lands on wq_hat: Hinv[q, q] / Hinv[q, q] = 1


def act_order(H):  # H: [in, in] -> [in] column indices, loudest input first
    return torch.argsort(torch.diag(H), descending=True)
