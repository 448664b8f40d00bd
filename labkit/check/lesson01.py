"""Checks for lesson 01 (magnitude and Wanda): Wanda's score, an N:M mask, and what a bitmask
format stores.

    check.lesson01.wanda_score(my_wanda_score)
    check.lesson01.nm_mask(my_nm_mask)
    check.lesson01.bitmask_bytes(my_bitmask_bytes)
"""

from __future__ import annotations

import math

import torch

from ..prune import masks, sparse_storage
from . import Verdict, call, exercise, tensor_like
from ._numbers import number_with_hints


@exercise
def wanda_score(fn) -> bool:
    """fn(W [out, in], X [tokens, in]) -> [out, in]: |W_ij| · ‖X_j‖₂, the L2 norm of input feature j
    over all tokens (Wanda eq. 1)."""
    v = Verdict("wanda_score")
    g = torch.Generator().manual_seed(1)
    # First case square in (tokens, in) so that a norm over the wrong axis still broadcasts and can be named.
    for out_f, tokens, in_f in [(4, 6, 6), (5, 20, 8)]:
        W = torch.randn(out_f, in_f, generator=g)
        X = torch.randn(tokens, in_f, generator=g)
        X[:, 2] *= 15  # an outlier feature
        norm = X.norm(dim=0)  # [in]
        expected = W.abs() * norm[None, :]
        got = call(v, fn, W.clone(), X.clone())
        hints = {
            "forgot the absolute value: a large negative weight matters as much as a large positive one": W * norm,
            (
                "used the squared norm ‖X_j‖² instead of ‖X_j‖₂ (the mask would still be the same; the score is not)"
            ): W.abs() * norm**2,
            "used the mean |x| of each feature (an L1 average) instead of its L2 norm": W.abs() * X.abs().mean(0),
            "used the L1 norm Σ|x| instead of the L2 norm": W.abs() * X.abs().sum(0),
            (
                "used the root-mean-square (‖X_j‖₂ / √tokens): the same ranking, but Wanda's score is the plain norm"
            ): W.abs() * norm / tokens**0.5,
            "multiplied by the weights' own column norms ‖W_:j‖ instead of the activations' ‖X_j‖": W.abs()
            * W.norm(dim=0),
            "used W² instead of |W|": W**2 * norm,
        }
        if tokens == in_f:
            hints[
                "took the norm over the wrong axis (over features, one per token): ‖X_j‖ is over the tokens, "
                "X.norm(dim=0) for X shaped [tokens, in]"
            ] = W.abs() * X.norm(dim=1)[None, :]
        if not tensor_like(v, got, expected, f"the score for W {out_f}x{in_f}, X {tokens}x{in_f}", hints=hints):
            break
    return v.report("S = |W| · ‖X‖₂ per input feature, as labkit.prune.wanda_scores.")


@exercise
def nm_mask(fn) -> bool:
    """fn(score [out, in], n, m) -> bool [out, in], True = pruned: in each group of m consecutive inputs
    of a row, the n highest scores are kept and the other m − n pruned."""
    v = Verdict("nm_mask")
    g = torch.Generator().manual_seed(2)
    for rows, cols, n, m in [(8, 8, 2, 4), (4, 16, 2, 8), (3, 12, 1, 4)]:
        score = torch.rand(rows, cols, generator=g)
        expected = masks.nm_mask(score, n, m)
        got = call(v, fn, score.clone(), n, m)
        hints = {
            (
                "inverted the mask: True must mean pruned (zeroed), and the n HIGHEST scores of each group are kept"
            ): ~expected,
            (
                f"pruned the lowest {1 - n / m:.0%} of each whole row, not within each group of {m} consecutive inputs"
            ): masks.row_mask(score, 1 - n / m),
        }
        if rows % m == 0:
            hints[
                f"made the groups of {m} along the output dimension (down a column); they run along the inputs of a row"
            ] = masks.nm_mask(score.T.contiguous(), n, m).T
        if isinstance(got, torch.Tensor) and got.dtype != torch.bool and tuple(got.shape) == (rows, cols):
            v.fail(f"the mask has dtype {got.dtype}; return a bool tensor (True = pruned), e.g. `scores < threshold`.")
        if not tensor_like(v, got, expected, f"the {n}:{m} mask of a {rows}x{cols} score", atol=0, rtol=0, hints=hints):
            break
    return v.report("Exactly n kept in every group of m, as labkit.prune.nm_mask.")


@exercise
def bitmask_bytes(fn) -> bool:
    """fn(weight [out, in]) -> int: bytes of the bitmask format: one bit per position (packed 8 per
    byte, a partly used last byte counts) plus every nonzero value at the weight's dtype size."""
    v = Verdict("bitmask_bytes")
    g = torch.Generator().manual_seed(3)
    cases = []
    w = torch.randn(6, 10, generator=g)
    w[torch.rand(6, 10, generator=g) < 0.5] = 0
    cases.append(("an fp32 6x10 matrix", w))
    w = torch.randn(16, 32, generator=g).half()
    w[torch.rand(16, 32, generator=g) < 0.7] = 0
    cases.append(("an fp16 16x32 matrix with about 70% zeros", w))
    w = torch.randn(3, 5, generator=g).bfloat16()
    w[0, :3] = 0
    cases.append(("a bf16 3x5 matrix", w))
    for label, w in cases:
        expected = sparse_storage.bitmask_bytes(w)
        nnz, numel, b = int((w != 0).sum()), w.numel(), w.element_size()
        got = call(v, fn, w.clone())
        hints = {
            "forgot the mask: the values alone do not say where they go": nnz * b,
            "stored the mask with one byte per position instead of one bit": numel + nnz * b,
            "stored every value, zeros included (only the nonzeros are kept)": math.ceil(numel / 8) + numel * b,
            "assumed 4 bytes per value; use the weight's element_size()": math.ceil(numel / 8) + nnz * 4,
            "counted the values in bits, not bytes": math.ceil(numel / 8) + nnz * 8 * b,
        }
        if numel % 8:
            hints[f"rounded the mask down: {numel} bits need ceil({numel} / 8) = {math.ceil(numel / 8)} bytes"] = (
                numel // 8 + nnz * b
            )
        if not number_with_hints(v, got, expected, f"the bitmask size of {label}", hints=hints):
            break
    return v.report("ceil(numel / 8) mask bytes + nnz · bytes per value, as labkit.prune.bitmask_bytes.")
