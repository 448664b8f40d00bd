"""Checks for lesson 08 (low rank): SVD-LLM's whitened factors (the lesson's "build it": lowrank.svd
runs them on the whole model), the parameters of a rank-r factorization, the break-even rank, and the
truncated-SVD reconstruction.

    check.lesson08.whitened_factors(my_whitened_factors)
    check.lesson08.factored_params(my_factored_params)
    check.lesson08.break_even_rank(my_break_even_rank)
    check.lesson08.rank_r_approximation(my_rank_r_approximation)
"""

from __future__ import annotations

import math
import numbers

import torch

from ..lowrank import break_even, truncated_svd, whitening
from ..lowrank import whitened_factors as _whitened_factors
from . import Verdict, call, describe, exercise, tensor_like

# (out_features, in_features, rank): SmolLM2-135M's shapes (q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576,
# down 576 x 1536) and LLaMA-7B's 4096 x 4096 and 11008 x 4096.
_SHAPES = [(576, 576, 64), (192, 576, 32), (1536, 576, 100), (576, 1536, 7), (4096, 4096, 512), (11008, 4096, 1024)]


def _whole_number(v: Verdict, got, what: str, hints: dict[str, float], expected: int) -> bool:
    """An integer answer, with hints for known wrong numbers (checked before the type)."""
    if v.problem is not None:
        return False
    for description, wrong in hints.items():
        if wrong != expected and isinstance(got, numbers.Real) and abs(float(got) - wrong) < 1e-9:
            return v.fail(f"{what} is {got:g}: it looks like you {description}.")
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        return v.fail(f"{what} should be a number, got {describe(got)}.")
    if not math.isfinite(got):
        return v.fail(f"{what} is {got}, not a finite number: a count is a whole number.")
    if float(got) != int(got):
        return v.fail(
            f"{what} is {got:g}, not a whole number: a count of parameters or of singular values is an integer."
        )
    if int(got) != expected:
        return v.fail(f"{what} is {int(got):,}; expected {expected:,}.")
    return True


@exercise
def factored_params(fn) -> bool:
    """fn(out_features, in_features, rank) -> int: the weights of A [rank, in] and B [out, rank] together."""
    v = Verdict("factored_params")
    for out_f, in_f, r in _SHAPES:
        got = call(v, fn, out_f, in_f, r)
        expected = r * (in_f + out_f)
        hints = {
            "multiplied everything (rank · in · out): the two factors hold rank · in + out · rank weights": r
            * in_f
            * out_f,
            "counted only A (rank · in); B adds out · rank more": r * in_f,
            "counted only B (out · rank); A adds rank · in more": r * out_f,
            "added the dense matrix too; the factors replace it": r * (in_f + out_f) + in_f * out_f,
        }
        if not _whole_number(v, got, f"the parameters for a {out_f} x {in_f} matrix at rank {r}", hints, expected):
            break
    return v.report("rank · (in + out): a rank-r pair stores r weights per input and per output.")


@exercise
def break_even_rank(fn) -> bool:
    """fn(out_features, in_features) -> int: the largest rank r with r · (in + out) <= in · out."""
    v = Verdict("break_even_rank")
    for out_f, in_f, _ in _SHAPES:
        got = call(v, fn, out_f, in_f)
        expected = break_even(out_f, in_f)
        exact = in_f * out_f / (in_f + out_f)
        hints = {
            "took half the smaller dimension; that is right only for square matrices (in = out)": min(in_f, out_f) // 2,
            "rounded up: one rank more than in · out / (in + out) stores more weights than the dense matrix": -(
                -in_f * out_f // (in_f + out_f)
            )
            if in_f * out_f % (in_f + out_f)
            else -1,
            "took min(in, out), the full rank: at full rank the factors cost more than the dense matrix": min(
                in_f, out_f
            ),
        }
        if isinstance(got, float) and abs(got - exact) < 1e-9 and got != int(got):
            v.fail(
                f"the break-even rank for {out_f} x {in_f} is {got:g}: round down to a whole rank "
                f"(floor of in · out / (in + out))."
            )
            break
        if not _whole_number(v, got, f"the break-even rank for a {out_f} x {in_f} matrix", hints, expected):
            break
    return v.report("⌊in · out / (in + out)⌋: below it the factors save weights (288 for 576 x 576).")


@exercise
def rank_r_approximation(fn) -> bool:
    """fn(W [out, in], rank) -> W_r [out, in] = U_r Σ_r V_rᵀ, the best rank-r approximation (Eckart–Young)."""
    v = Verdict("rank_r_approximation")
    g = torch.Generator().manual_seed(8)
    for shape, r in (((8, 8), 3), ((6, 8), 2), ((10, 7), 4)):
        W = torch.randn(*shape, generator=g)  # [out, in]
        got = call(v, fn, W.clone(), r)
        if v.problem:
            break
        A, B, _ = truncated_svd(W, r)
        expected = B @ A
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        hints = {
            "kept the r smallest singular values instead of the r largest (torch.linalg.svd sorts them "
            "in descending order: keep the first r)": U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:],
            "forgot the singular values: U_r V_rᵀ without Σ_r in between": U[:, :r] @ Vh[:r],
            "took the first r columns of Vh instead of its first r rows (Vh = Vᵀ: its rows are the right "
            "singular vectors)": U[:, :r] @ torch.diag(S[:r]) @ Vh[:, :r].T,
            "returned W itself, not its rank-r approximation": W,
        }
        if not tensor_like(
            v, got, expected, f"W_r for a {shape[0]} x {shape[1]} matrix at rank {r}", atol=1e-4, hints=hints
        ):
            break
    return v.report("U_r Σ_r V_rᵀ: its squared error is the sum of the discarded σ_i², the smallest possible.")


__all__ = ["break_even_rank", "factored_params", "rank_r_approximation"]


def _whitened_case(seed: int, out_f: int, in_f: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(4 * in_f, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    X[:, 0] *= 10  # an outlier input: whitening weighs its column
    return W, whitening(X.T @ X)  # S: [in, in] lower triangular, fp64


@exercise
def whitened_factors(fn) -> bool:
    """fn(W [out, in], S [in, in], rank) -> (A [rank, in], B [out, rank], s): SVD-LLM's rank-r factors.
    With U Σ Vᵀ the SVD of the whitened matrix W S (S lower triangular, S Sᵀ = X Xᵀ), B @ A = U_r Σ_r V_rᵀ S⁻¹
    (the r largest singular values, the whitening undone), and s the singular values of W S. Any split of
    Σ_r between A and B gives the same layer; labkit splits √Σ_r to each."""
    v = Verdict("whitened_factors")
    for seed, out_f, in_f, rank in [(1, 6, 8, 3), (2, 10, 5, 2)]:
        W, S = _whitened_case(seed, out_f, in_f)
        A0, B0, s0 = _whitened_factors(W, S, rank)
        got = call(v, fn, W.clone(), S.clone(), rank)
        if v.problem:
            break
        if not isinstance(got, tuple) or len(got) != 3:
            v.fail(f"return a triple (A, B, s); got {type(got).__name__}.")
            break
        A, B, s = got
        what = f"W {out_f}x{in_f} at rank {rank}"
        if not tensor_like(v, A, A0, f"A of {what} (its shape)", atol=math.inf, rtol=math.inf):
            break
        if not tensor_like(v, B, B0, f"B of {what} (its shape)", atol=math.inf, rtol=math.inf):
            break
        U, sw, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
        Ui, si, Vhi = torch.linalg.svd(W.double(), full_matrices=False)
        Sinv = torch.linalg.inv(S)
        hints = {
            "forgot the whitening: that is plain SVD of W; SVD-LLM factors W S": Ui[:, :rank] * si[:rank] @ Vhi[:rank],
            "forgot to undo the whitening: A must be multiplied by S⁻¹ (torch.linalg.solve_triangular), since "
            "W S S⁻¹ = W": U[:, :rank] * sw[:rank] @ Vh[:rank],
            "undid the whitening with S⁻ᵀ instead of S⁻¹": U[:, :rank] * sw[:rank] @ Vh[:rank] @ Sinv.T,
            "kept the smallest singular values: the SVD sorts them in decreasing order, keep the first r": U[:, -rank:]
            * sw[-rank:]
            @ Vh[-rank:]
            @ Sinv,
        }
        product = (B.double() @ A.double()) if isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) else None
        if not tensor_like(
            v, product, (B0.double() @ A0.double()), f"B @ A of {what}", atol=1e-4, rtol=1e-3, hints=hints
        ):
            break
        s_hints = {"returned the singular values of W: s are those of the whitened matrix W S": si}
        if not tensor_like(v, s, s0, f"s of {what}", atol=1e-4, rtol=1e-4, hints=s_hints):
            break
    return v.report("B @ A = U_r Σ_r V_rᵀ S⁻¹, the rank-r layer with the least output error (SVD-LLM).")
