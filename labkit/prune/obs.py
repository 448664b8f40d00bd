"""Optimal Brain Surgeon, row by row (Hassibi & Stork, 1993; as OBC applies it to one layer, Frantar et al., 2022).

The layer-wise problem separates over output rows: row w (a vector over the inputs) should keep
w·X while losing weights. With H = 2XXᵀ/n, removing weight q and re-fitting the others optimally
costs, and changes the row by (OBS eqs. 4-5):

    ΔE_q = w_q² / (2 [H⁻¹]_qq),      δw = − (w_q / [H⁻¹]_qq) · H⁻¹_{:,q}

Greedy OBS prunes the cheapest weight, applies δw, removes q from H⁻¹ (one rank-1 downdate,
the inverse of H with row/column q eliminated), and repeats. Each row keeps its own H⁻¹, which
is exact but costs O(rows · in² ) memory and O(rows · k · in²) time: fine for a lesson's slice
of a layer, far too slow for a whole LLM. SparseGPT's trick is to fix the column order, so that
all rows share one sequence of inverses (one Cholesky factor).
"""

from __future__ import annotations

import torch

from .masks import check_sparsity, n_pruned


@torch.no_grad()
def obs_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, percdamp: float = 0.01):
    """Greedy OBS of every row of `weight` to `sparsity`; returns (pruned weight, mask True = pruned).

    weight: [rows, in_features]; H: [in_features, in_features] = 2XXᵀ/n (dampened by percdamp·mean diag).
    Memory: rows · in_features² floats; keep `rows` small (a slice of a layer).
    """
    sparsity, _ = check_sparsity(sparsity, "unstructured")
    W = weight.detach().clone().float()  # [rows, d]
    rows, d = W.shape
    H = H.detach().clone().float()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H).expand(rows, d, d).clone()  # [rows, d, d]: one inverse per row
    pruned = torch.zeros_like(W, dtype=torch.bool)
    r = torch.arange(rows, device=W.device)
    for _ in range(n_pruned(sparsity, d)):
        scores = W**2 / Hinv.diagonal(dim1=1, dim2=2)  # 2·ΔE_q for every remaining weight
        scores[pruned] = float("inf")
        q = scores.argmin(dim=1)  # [rows]: the cheapest weight of each row
        col = Hinv[r, :, q]  # [rows, d]: H⁻¹_{:,q}
        pivot = Hinv[r, q, q]  # [rows]
        W -= (W[r, q] / pivot)[:, None] * col  # δw (eq. 5)
        W[r, q] = 0  # exactly zero
        pruned[r, q] = True
        Hinv -= col[:, :, None] * col[:, None, :] / pivot[:, None, None]  # eliminate q from H⁻¹
        W[pruned] = 0  # pruned entries of H⁻¹ are now zero; clear their rounding residue
    return W.to(weight.dtype), pruned


def output_error(weight: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """Relative squared output error ‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    W, dW = weight.float(), (weight - pruned).float()
    return (torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T)).item()
