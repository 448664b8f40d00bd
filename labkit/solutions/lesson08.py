"""Worked solutions of lesson 08's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def whitened_factors(W, S, rank):
    """W: [out, in]; S: [in, in], lower triangular with S S^T = X X^T (the whitening). Returns
    (A [rank, in], B [out, rank], s): SVD-LLM's rank-r factors, B @ A = U_r diag(s_r) V_r^T S^-1."""
    U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)  # the whitened matrix W S, in fp64
    root = s[:rank].sqrt()  # split each singular value evenly between the two factors
    A, B = root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]
    A = torch.linalg.solve_triangular(S, A, upper=False, left=False)  # A S^-1: undo the whitening
    return A.float(), B.float(), s.float()


def factored_params(out_features, in_features, rank):
    return rank * (in_features + out_features)  # A: rank x in, B: out x rank


def break_even_rank(out_features, in_features):
    return (out_features * in_features) // (out_features + in_features)  # r (in + out) <= in out


def rank_r_approximation(W, rank):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # S sorted descending; rows of Vh are the v_i
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
