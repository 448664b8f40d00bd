"""Checks for lesson 01 (magnitude and Wanda): Wanda's mask (the lesson's "build it": prune.wanda
runs it on the whole model), an N:M mask, and what a bitmask format stores.

    check.lesson01.wanda_mask(my_wanda_mask)
    check.lesson01.nm_mask(my_nm_mask)
    check.lesson01.bitmask_bytes(my_bitmask_bytes)
"""

from __future__ import annotations

import math

import torch

from ..prune import masks, sparse_storage
from . import Verdict, call, exercise, tensor_like
from ._numbers import number_with_hints


def _row_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of each row."""
    lowest = score.sort(dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter(1, lowest, True)


@exercise
def wanda_mask(fn) -> bool:
    """fn(W [out, in], norm [in], sparsity) -> bool [out, in], True = pruned: Wanda's score
    S_ij = |W_ij| · ‖X_j‖₂ (eq. 1, norm[j] = ‖X_j‖₂), and in every row the round(sparsity · in)
    lowest scores pruned (each output row is its own comparison group)."""
    v = Verdict("wanda_mask")
    g = torch.Generator().manual_seed(1)
    for out_f, in_f, sparsity in [(6, 12, 0.3), (4, 8, 0.5), (5, 16, 0.75)]:
        W = torch.randn(out_f, in_f, generator=g)
        X = torch.randn(64, in_f, generator=g)  # 64 calibration tokens
        X[:, 2] *= 15  # an outlier feature: its small weights must survive
        norm = X.norm(dim=0)  # [in]
        score = W.abs() * norm[None, :]
        k = masks.n_pruned(sparsity, in_f)
        expected = _row_mask(score, k)
        got = call(v, fn, W.clone(), norm.clone(), sparsity)
        hints = {}  # first: int() rounding down looks like "one too few"
        if int(sparsity * in_f) != k:
            hints[f"rounded sparsity · in down with int(): prune round(sparsity · in) = {k} per row"] = _row_mask(
                score, int(sparsity * in_f)
            )
        hints |= {
            "inverted the mask: True must mean pruned (zeroed), and the LOWEST scores are pruned": ~expected,
            "pruned the highest scores: Wanda prunes the lowest |W| · ‖X‖ of each row": _row_mask(-score, k),
            "forgot the activations: that is magnitude pruning, |W| alone; Wanda multiplies by ‖X_j‖₂": _row_mask(
                W.abs(), k
            ),
            "forgot the absolute value: a large negative weight matters as much as a large positive one": _row_mask(
                W * norm, k
            ),
            "used W² · ‖X‖ instead of |W| · ‖X‖ (a different ranking)": _row_mask(W**2 * norm, k),
            (
                "used one threshold for the whole matrix: Wanda compares the weights of each output row "
                "among themselves (k per row)"
            ): masks.lowest_mask([score], masks.n_pruned(sparsity, score.numel()))[0],
            "compared within each column (input feature) instead of within each row": _row_mask(
                score.T.contiguous(), masks.n_pruned(sparsity, out_f)
            ).T,
            f"pruned {k - 1} per row, one too few: prune round(sparsity · in) = {k}": _row_mask(score, k - 1),
            f"pruned {k + 1} per row, one too many: prune round(sparsity · in) = {k}": _row_mask(score, k + 1),
        }
        if isinstance(got, torch.Tensor) and got.dtype != torch.bool and tuple(got.shape) == (out_f, in_f):
            v.fail(f"the mask has dtype {got.dtype}; return a bool tensor (True = pruned), e.g. `scores < threshold`.")
        what = f"the mask of W {out_f}x{in_f} at sparsity {sparsity}"
        if not tensor_like(v, got, expected, what, atol=0, rtol=0, hints=hints):
            break
    return v.report("|W| · ‖X‖₂, the lowest round(sparsity · in) of every row pruned, as labkit.prune.wanda_mask.")


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
