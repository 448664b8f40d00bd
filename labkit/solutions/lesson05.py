"""Worked solutions of lesson 05's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch

from .lesson02 import obs_block as gptq_block  # noqa: F401 (GPTQ's loop is lesson 02's, with rounding as the constraint)


def hessian(X):  # X: [tokens, in]
    return 2 * X.T @ X / X.shape[0]  # [in, in]; walk.Hessian does the same, summing over batches


def obq_update(W, H, q, wq_hat):  # W: [rows, in], H: [in, in], wq_hat: [rows]
    Hinv = torch.linalg.inv(H)
    err = (W[:, q] - wq_hat) / Hinv[q, q]  # [rows]: each row's error, scaled (eq. 2)
    return W - err[:, None] * Hinv[q][None, :]  # column q lands on wq_hat: Hinv[q, q] / Hinv[q, q] = 1


def act_order(H):  # H: [in, in] -> [in] column indices, loudest input first
    return torch.argsort(torch.diag(H), descending=True)
