"""Checks for lesson 05 (GPTQ): the Hessian from activations, the OBQ update after quantizing one
column, act-order's column permutation, and GPTQ's quantize-and-propagate loop over one block (the
lesson's "build it": quant.gptq runs it on the whole model). Each runs the learner's function on
small hand-made tensors and says in words what is wrong."""

from __future__ import annotations

import torch

from ..quant import formats
from ..quant.gptq import GroupGrids
from . import Verdict, _kind, call, exercise, tensor_like
from ._blocks import block_case, check_block_loop


def _activations(tokens: int = 40, features: int = 6) -> torch.Tensor:
    """X [tokens, features]: correlated features, one of them (index 2) an outlier."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(tokens, features, generator=g) @ (
        torch.eye(features) + 0.5 * torch.randn(features, features, generator=g)
    )
    X[:, 2] *= 10
    return X


@exercise
def hessian(fn) -> bool:
    """fn(X) with X [tokens, in] -> H [in, in] = 2 XᵀX / n, the Hessian of ‖WX − ŴX‖² / n per row of W."""
    v = Verdict("hessian")
    X = _activations()
    n = X.shape[0]
    expected = 2 * X.T @ X / n
    got = call(v, fn, X.clone())
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, n):
        v.fail("H is [tokens, tokens]: you computed X Xᵀ; with X as [tokens, in] the Hessian is XᵀX, [in, in].")
    tensor_like(
        v,
        got,
        expected,
        "H",
        hints={
            "forgot the factor 2 (the derivative of a square)": X.T @ X / n,
            "did not divide by the number of tokens n": 2 * X.T @ X,
            "divided by the number of features instead of the number of tokens": 2 * X.T @ X / X.shape[1],
            "took only the diagonal (the squared column norms) instead of the full matrix XᵀX": torch.diag(
                2 * (X**2).sum(0) / n
            ),
        },
    )
    return v.report("H is symmetric and its diagonal is 2‖X_j‖²/n.")


def _layer(rows: int = 4, columns: int = 6):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(rows, columns, generator=g)
    X = _activations(columns * 8, columns)
    H = 2 * X.T @ X / X.shape[0] + 0.01 * torch.eye(columns)
    return W, H


@exercise
def obq_update(fn) -> bool:
    """fn(W, H, q, wq_hat) -> W after quantizing column q to wq_hat and updating the other columns (OBQ, eq. 2):
    W − (W[:, q] − wq_hat) / [H⁻¹]_qq ⊗ H⁻¹[q, :]."""
    v = Verdict("obq_update")
    W, H = _layer()
    q = 2
    wq_hat = torch.round(W[:, q] * 2) / 2  # a grid of step 0.5
    Hinv = torch.linalg.inv(H)
    err = (W[:, q] - wq_hat) / Hinv[q, q]  # [rows]
    expected = W - err[:, None] * Hinv[q][None, :]
    got = call(v, fn, W.clone(), H.clone(), q, wq_hat.clone())
    tensor_like(
        v,
        got,
        expected,
        "the updated W",
        atol=1e-4,
        hints={
            "used H where the update needs H⁻¹": W - ((W[:, q] - wq_hat) / H[q, q])[:, None] * H[q][None, :],
            "flipped the sign of the update (it must subtract the error times H⁻¹[q, :])": W
            + err[:, None] * Hinv[q][None, :],
            "forgot to divide the error by [H⁻¹]_qq": W - (W[:, q] - wq_hat)[:, None] * Hinv[q][None, :],
            "used the weight w_q itself instead of the quantization error w_q − quant(w_q) (that is OBS pruning)": W
            - (W[:, q] / Hinv[q, q])[:, None] * Hinv[q][None, :],
            "quantized column q but left the other columns unchanged": torch.cat(
                [W[:, :q], wq_hat[:, None], W[:, q + 1 :]], 1
            ),
        },
    )
    if v.problem is None and not torch.allclose(got[:, q], wq_hat, atol=1e-4):
        v.fail(f"column {q} should end exactly on its quantized value wq_hat.")
    return v.report("Column q lands on its grid value and the others absorb its error.")


@exercise
def act_order(fn) -> bool:
    """fn(H) -> LongTensor [in]: the column order of act-order, by decreasing diagonal of H."""
    v = Verdict("act_order")
    _, H = _layer(columns=8)
    expected = torch.argsort(torch.diag(H), descending=True)
    got = call(v, fn, H.clone())
    if (
        isinstance(got, torch.Tensor)
        and _kind(got) == "int"
        and got.shape == expected.shape
        and not torch.equal(got.sort().values, torch.arange(8, dtype=got.dtype))
    ):
        v.fail("the result is not a permutation of 0..in−1 (each column must appear exactly once).")
    tensor_like(
        v,
        got,
        expected,
        "the column order",
        atol=0,
        rtol=0,
        hints={
            (
                "sorted in increasing order: act-order quantizes the columns with the *largest* activations first"
            ): torch.argsort(torch.diag(H)),
            "sorted by the row sums of H instead of its diagonal": torch.argsort(H.sum(1), descending=True),
            "returned the sorted diagonal values' ranks (the inverse permutation)": torch.argsort(
                torch.argsort(torch.diag(H), descending=True)
            ),
        },
    )
    return v.report("Largest diag(H) first.")


def _grid_cases():
    cases = []
    for seed, rows, block, bits, group_size in [(1, 5, 8, 3, None), (2, 4, 12, 4, 4)]:
        W1, Hinv1 = block_case(seed, rows, block)

        def make_quantize(W1=W1, bits=bits, group_size=group_size):  # fresh: it makes each group's grid in turn
            if group_size is None:
                scale, zero = formats.find_params(W1, bits)
                return lambda i, blk: formats.round_to_grid(blk[:, i], scale, zero, bits)
            return GroupGrids(bits, group_size, False, False, None).column(0)

        what = f"a block of {rows} rows x {block} columns at {bits} bits" + (
            f", groups of {group_size}" if group_size else ""
        )
        cases.append((W1, Hinv1, make_quantize, what))
    return cases


@exercise
def gptq_block(fn) -> bool:
    """fn(W1 [rows, B], Hinv1 [B, B], quantize) -> (Q1, Err1, Losses1), each [rows, B]: GPTQ's Alg. 1 over one
    block (labkit.walk.obs_block with quantize as the constraint; lesson 02 wrote it with prune). For each
    column i in order: q = quantize(i, W1) (column i of the block as updated so far, on its grid);
    Losses1[:, i] = (w − q)² / d² and Err1[:, i] = (w − q) / d with w = W1[:, i] and d = Hinv1[i, i];
    then W1[:, i:] −= Err1[:, i] ⊗ Hinv1[i, i:] (eq. 2, the upper Cholesky factor's row i)."""
    v = Verdict("gptq_block")
    check_block_loop(v, fn, _grid_cases(), "rounded")
    return v.report("Alg. 1's loop: labkit.walk.obs_block, column by column, the error spread through H⁻¹'s factor.")
