"""SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (Frantar & Alistarh, 2023).

For each linear layer, SparseGPT minimises the layer-wise reconstruction error (eq. 1)

    argmin_{mask, Ŵ} ‖W X − (mask ⊙ Ŵ) X‖²₂,      H = 2 X Xᵀ / n  (its Hessian per row)

column by column, left to right. When column j is pruned, the Optimal Brain Surgeon update
(eq. 3) spreads its error over the columns not yet processed:

    δ = − (w_j / [H⁻¹]_jj) · H⁻¹_{j,:}

Using the rows of the upper Cholesky factor of H⁻¹ instead of H⁻¹ itself gives exactly the
updates with H⁻¹ restricted to the remaining columns (the sequence of inverses (H_Uj)⁻¹ of the
paper's fig. 4), for every row at once. The mask is chosen adaptively, every B_s columns, by the
OBS error w²/[H⁻¹]²_jj ("adaptive mask selection"), and updates to later blocks are batched
("lazy batch-update", as in GPTQ). This file follows Algorithm 1 of the paper and the authors'
reference code, which use one blocksize for both B and B_s.
In the code, [H⁻¹]_jj is the diagonal of that Cholesky factor: its square is the diagonal of
the inverse Hessian of columns j, j+1, ... (the OBS denominator at the moment j is pruned).
"""

from __future__ import annotations

import time

import torch

from ..transform import all_or_nothing, check_count, check_damping, replace_data
from ..walk import (
    Hessian,
    calibration_walk,
    check_calibration,
    checked_block,
    in_turn,
    inverse_hessian_cholesky,
    obs_block,
)
from .masks import (
    PruneReport,
    check_divisible,
    check_pruneable,
    check_sparsity,
    lowest_mask,
    n_pruned,
    record_prune,
    report,
    weight_linears,
)


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None,
    pattern: str = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
    prune_block=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT on one matrix (Algorithm 1). Does not change `weight`.

    weight: [out_features, in_features]; H: [in_features, in_features] = 2 X Xᵀ / n.
    Returns (pruned and updated weight [out, in] in weight's dtype, mask [out, in] True = pruned
    (weights of dead inputs are zeroed as well, whether or not the mask picked them),
    loss [out]: the OBS estimate of each row's error, Σ_j (w_j − q_j)² / [H⁻¹]²_jj / 2).
    Unstructured: each block of columns prunes its share of round(sparsity · numel), so the
    matrix gets exactly that many zeros. N:M: N of each M consecutive columns kept (M | blocksize).
    prune_block: None (labkit's loop) or your own loop over one block, prune_block(W1, Hinv1, prune) ->
    (Q1, Err1, Losses1) with labkit.walk.obs_block's contract (lesson 02's "build it"); prune(i, W1) sets
    the pruned weights of column i to 0, choosing an N:M group's mask as the loop reaches it.
    """
    sparsity, nm = check_sparsity(sparsity, pattern)
    _check_blocksize(blocksize, nm)
    W = weight.detach().clone().float()  # W: [rows, columns]
    rows, columns = W.shape
    if nm is not None and columns % nm[1]:
        raise ValueError(f"pattern={pattern!r} needs in_features divisible by M={nm[1]}; got {columns}.")
    Hinv, dead = inverse_hessian_cholesky(H.to(W.device), percdamp)  # Hinv: [columns, columns], upper
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, device=W.device)

    for i1 in range(0, columns, blocksize):  # Algorithm 1: blocks of B columns
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()  # [rows, i2 - i1]: this block, with all earlier updates applied
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)  # [i2 - i1]

        if nm is None:  # adaptive mask selection: lowest w²/[H⁻¹]²_jj in the next B_s columns
            k = n_pruned(sparsity, rows * i2) - n_pruned(sparsity, rows * i1)  # this block's share
            mask1 = lowest_mask([W1**2 / d1[None, :] ** 2], k)[0]
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        prune = _pruner(mask1, d1, nm)  # column i of the block, its pruned weights set to 0
        if prune_block is None:  # Q1: the pruned block; Err1: scaled errors, for the lazy update of later blocks
            Q1, Err1, Losses1 = obs_block(W1, Hinv1, prune)
        else:  # the learner's loop, on a copy of the block
            Q1, Err1, Losses1 = checked_block(prune_block(W1, Hinv1.clone(), prune), W1, "prune_block", prune)

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += Losses1.sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch-update of all later blocks
        del Q1, Err1, Losses1  # not alive while the next block's are made (the rehearsed GPU peak)

    return W.to(weight.dtype), mask, losses


def _pruner(mask1: torch.Tensor, d1: torch.Tensor, nm):
    """prune(i, W1) for the block loop (walk.obs_block, or a learner's): column i with its pruned weights set
    to 0; for N:M, the mask of the next M columns is chosen from the block as updated so far (OBS error w²/d²).
    mask1: [rows, B] (filled in place for N:M); d1: [B] the diagonal of the block's Cholesky factor."""

    @in_turn
    def prune(i, block):  # block: [rows, B] as updated so far
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            scores = block[:, i : i + m] ** 2 / d1[None, i : i + m] ** 2  # [rows, m]
            lowest = torch.topk(scores, m - n, dim=1, largest=False).indices
            mask1.scatter_(1, i + lowest, True)
        q = block[:, i].clone()
        q[mask1[:, i]] = 0  # freeze: the pruned weights become 0, the rest stay
        return q

    return prune


def sparsegpt_naive(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None,
    pattern: str = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same algorithm written the slow, obvious way, to check sparsegpt_prune against (small matrices only).

    Column by column, with the inverse of H restricted to the columns not yet processed,
    F = {j, j+1, ...}, computed afresh: prune w_j if masked and update the rest by OBS (eq. 3)
        δ_F = − (w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,:}
    No Cholesky factor, no blocks of lazy updates: O(columns⁴). Returns (weight, mask).
    """
    sparsity, nm = check_sparsity(sparsity, pattern)
    W = weight.detach().clone().float()  # [rows, columns]
    rows, columns = W.shape
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    W[:, dead] = 0
    hinv_diag = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(columns)])  # [H_F⁻¹]_jj per j
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(columns):
        scores = W**2 / hinv_diag[None, :]  # OBS error of pruning each weight now
        if nm is None and j % blocksize == 0:  # adaptive mask for the next block
            j2 = min(j + blocksize, columns)
            k = n_pruned(sparsity, rows * j2) - n_pruned(sparsity, rows * j)
            mask[:, j:j2] = lowest_mask([scores[:, j:j2]], k)[0]
        if nm is not None and j % nm[1] == 0:  # N:M: keep the N best of the next M
            lowest = torch.topk(scores[:, j : j + nm[1]], nm[1] - nm[0], dim=1, largest=False).indices
            mask[:, j : j + nm[1]].scatter_(1, lowest, True)
        Hinv_F = torch.linalg.inv(H[j:, j:])  # [columns - j, columns - j]
        err = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j]))  # w_j − q_j
        W[:, j:] -= (err / Hinv_F[0, 0])[:, None] * Hinv_F[0][None, :]
        W[mask[:, j], j] = 0  # exactly zero, not zero up to rounding
    return W.to(weight.dtype), mask


@torch.no_grad()
@all_or_nothing
def sparsegpt(
    model,
    calibration: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
    device=None,
    batch_size: int = 8,
    prune_block=None,
) -> PruneReport:
    """Prune every decoder nn.Linear of `model` in place with SparseGPT.

    calibration: LongTensor [n_samples, seqlen] (labkit.data.calibration).
    sparsity: fraction zeroed per matrix, in [0, 1); with pattern "N:M" it is 1 − N/M (pass None).
    blocksize: columns per adaptive-mask block and lazy update (the paper's B_s = 128).
    percdamp: dampening λ = percdamp · mean(diag H) added to H's diagonal.
    Layers are walked in order with labkit.walk.calibration_walk: each layer's Hessian comes
    from the outputs of the already-pruned layers before it.
    prune_block: None (labkit's loop) or your own loop over one block (lesson 02's "build it"), with
    labkit.walk.obs_block's contract; an answer of the wrong shape raises ValueError, the model unchanged.
    """
    sparsity, nm = check_sparsity(sparsity, pattern)
    if prune_block is not None and not callable(prune_block):
        raise ValueError(f"prune_block={prune_block!r}: pass a function prune_block(W1, Hinv1, prune), or None.")
    check_pruneable(model, "prune.sparsegpt")
    check_divisible(weight_linears(model), nm)
    _check_blocksize(blocksize, nm)
    check_damping(percdamp)
    check_calibration(calibration, model)
    check_count(batch_size, "batch_size")
    start = time.perf_counter()

    def make_stats(name, linear):
        return Hessian(linear.in_features, device=linear.weight.device)

    def update(index, layer, stats):
        for name, linear in layer.named_modules():
            if name in stats:
                pruned, _, _ = sparsegpt_prune(
                    linear.weight, stats[name].H, sparsity, pattern, blocksize, percdamp, prune_block=prune_block
                )
                replace_data(linear.weight, pruned)

    calibration_walk(model, calibration, make_stats, update, device=device, batch_size=batch_size, desc="sparsegpt")
    record_prune(model, "sparsegpt", pattern, sparsity)
    return report("sparsegpt", pattern, sparsity, time.perf_counter() - start, model)


def _check_blocksize(blocksize, nm) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r}: need a positive integer number of columns, e.g. 128.")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(
            f"blocksize={blocksize} must be a multiple of M={nm[1]} for pattern '{nm[0]}:{nm[1]}', "
            f"so that no group of M columns straddles two blocks."
        )
