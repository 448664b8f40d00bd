"""Checks for lesson 02 (OBS and SparseGPT): the OBS error of removing each weight, the OBS update
of the remaining weights, and a layer's relative output error.

    check.lesson02.obs_error(my_obs_error)
    check.lesson02.obs_update(my_obs_update)
    check.lesson02.output_error(my_output_error)
"""

from __future__ import annotations

import torch

from ..prune import masks
from . import Verdict, call, exercise, tensor_like
from ._blocks import block_case, check_block_loop
from ._numbers import number_with_hints


def _problem(d: int = 6, rows: int = 4, seed: int = 0):
    """A row w [d] (or W [rows, d]) and H = 2XᵀX/n [d, d] from correlated inputs X [n, d]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(120, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return W, H, X


@exercise
def obs_error(fn) -> bool:
    """fn(w [d], H [d, d]) -> [d]: ΔE_q = w_q² / (2 [H⁻¹]_qq), the increase of the layer error when weight q is
    removed and the others are re-fitted optimally (OBS)."""
    v = Verdict("obs_error")
    W, H, _ = _problem()
    w = W[0]
    Hinv = torch.linalg.inv(H)
    expected = w**2 / (2 * Hinv.diagonal())
    got = call(v, fn, w.clone(), H.clone())
    tensor_like(
        v,
        got,
        expected,
        "ΔE",
        atol=1e-8,
        rtol=1e-5,
        hints={
            "divided by H_qq instead of [H⁻¹]_qq: 1 / H_qq equals [H⁻¹]_qq only when H is diagonal. Invert H first, "
            "then take the diagonal": w**2 / (2 * H.diagonal()),
            "computed the error of zeroing w_q with the other weights left as they are (½ w_q² H_qq, what magnitude "
            "and Wanda minimise); OBS re-fits the others, which is why the denominator is [H⁻¹]_qq": w**2
            * H.diagonal()
            / 2,
            "forgot the 1/2 (the ranking is the same, but the error ΔE is w_q² / (2 [H⁻¹]_qq))": w**2 / Hinv.diagonal(),
            "forgot to square w_q": w.abs() / (2 * Hinv.diagonal()),
            "multiplied by [H⁻¹]_qq instead of dividing": w**2 * Hinv.diagonal() / 2,
        },
    )
    return v.report("The cheapest weight to remove is argmin ΔE (labkit.prune.obs uses w² / [H⁻¹]_qq, twice ΔE).")


@exercise
def obs_update(fn) -> bool:
    """fn(w [d], H [d, d], q) -> [d]: w + δ with δ = −(w_q / [H⁻¹]_qq) · H⁻¹_{:,q}; entry q becomes 0 and the
    others are the least-squares re-fit without input q."""
    v = Verdict("obs_update")
    W, H, _ = _problem(seed=1)
    w, q = W[1], 2
    Hinv = torch.linalg.inv(H)
    expected = w - w[q] / Hinv[q, q] * Hinv[:, q]
    got = call(v, fn, w.clone(), H.clone(), q)
    zeroed = w.clone()
    zeroed[q] = 0
    tensor_like(
        v,
        got,
        expected,
        "the updated row",
        atol=1e-6,
        rtol=1e-5,
        hints={
            "set w_q to zero but left the other weights unchanged: that is magnitude/Wanda pruning; OBS also moves "
            "the others by δ": zeroed,
            "flipped the sign of δ (w_q then doubles instead of vanishing)": w + w[q] / Hinv[q, q] * Hinv[:, q],
            "used H where the update needs H⁻¹": w - w[q] / H[q, q] * H[:, q],
            "used the column of H⁻¹ but divided by H_qq instead of [H⁻¹]_qq": w - w[q] / H[q, q] * Hinv[:, q],
            "forgot to divide by [H⁻¹]_qq": w - w[q] * Hinv[:, q],
        },
    )
    if v.problem is None and abs(float(got[q])) > 1e-6 * max(1.0, abs(float(w[q]))):
        v.fail(f"entry q={q} should be exactly 0 after the update; it is {float(got[q]):.3g}.")
    return v.report("w_q is 0 and the other weights equal the least-squares re-fit without input q.")


@exercise
def output_error(fn) -> bool:
    """fn(W [rows, d], W_hat [rows, d], H [d, d]) -> float: ‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    v = Verdict("output_error")
    W, H, _ = _problem(seed=2)
    W_hat = W.clone()
    W_hat[W.abs() < W.abs().median()] = 0  # a pruned copy
    dW = W - W_hat
    expected = (torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T)).item()
    got = call(v, fn, W.clone(), W_hat.clone(), H.clone())
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    number_with_hints(
        v,
        got,
        expected,
        "the relative output error",
        rtol=1e-6,
        hints={
            "compared the weights, ‖ΔW‖² / ‖W‖², instead of the outputs (the output error "
            "weighs each input direction by H)": (dW.norm() ** 2 / W.norm() ** 2).item(),
            "returned the absolute error tr(ΔW H ΔWᵀ) without dividing by tr(W H Wᵀ)": torch.trace(
                dW @ H @ dW.T
            ).item(),
            "took the square root (a relative norm); the exercise asks for the ratio of squared norms": expected**0.5,
            "divided by tr(Ŵ H Ŵᵀ), the pruned layer's output, instead of the original's": (
                torch.trace(dW @ H @ dW.T) / torch.trace(W_hat @ H @ W_hat.T)
            ).item(),
            "used only the diagonal of H (as if the inputs were uncorrelated)": (
                (dW**2 * H.diagonal()).sum() / (W**2 * H.diagonal()).sum()
            ).item(),
        },
    )
    return v.report("The same as labkit.prune.obs.output_error: what the layer comparison in section 2 prints.")


def _mask_cases():
    cases = []
    for seed, rows, block, nm in [(3, 5, 8, None), (4, 4, 12, (2, 4))]:
        W1, Hinv1 = block_case(seed, rows, block)
        d1 = torch.diag(Hinv1)

        def make_prune(W1=W1, d1=d1, nm=nm):  # fresh: an N:M mask is chosen as the loop reaches each group
            if nm is None:  # the block's mask, chosen before the loop (SparseGPT's adaptive mask selection)
                mask = masks.lowest_mask([W1**2 / d1[None, :] ** 2], W1.numel() // 2)[0]
                return lambda i, blk: blk[:, i].masked_fill(mask[:, i], 0)
            mask = torch.zeros_like(W1, dtype=torch.bool)

            def prune(i, blk):
                n, m = nm
                if i % m == 0:
                    scores = blk[:, i : i + m] ** 2 / d1[None, i : i + m] ** 2
                    mask.scatter_(1, i + torch.topk(scores, m - n, dim=1, largest=False).indices, True)
                return blk[:, i].masked_fill(mask[:, i], 0)

            return prune

        what = f"a block of {rows} rows x {block} columns, " + ("50% unstructured" if nm is None else "2:4")
        cases.append((W1, Hinv1, make_prune, what))
    return cases


@exercise
def obs_block(fn) -> bool:
    """fn(W1 [rows, B], Hinv1 [B, B], prune) -> (Q1, Err1, Losses1), each [rows, B]: SparseGPT's loop over one
    block (labkit.walk.obs_block). For each column i in order: q = prune(i, W1) (column i of the block as
    updated so far, its pruned weights set to 0); Losses1[:, i] = (w − q)² / d² and Err1[:, i] = (w − q) / d
    with w = W1[:, i] and d = Hinv1[i, i]; then W1[:, i:] −= Err1[:, i] ⊗ Hinv1[i, i:] (the OBS update, eq. 3,
    with the upper Cholesky factor's row i)."""
    v = Verdict("obs_block")
    check_block_loop(v, fn, _mask_cases(), "pruned")
    return v.report("SparseGPT's loop: labkit.walk.obs_block, the pruned weights' error spread through H⁻¹'s factor.")
