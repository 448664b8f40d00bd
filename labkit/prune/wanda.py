"""Wanda: Pruning by Weights and activations (Sun, Liu, Bair & Kolter, 2023).

Score of weight W_ij (Wanda eq. 1):   S_ij = |W_ij| · ‖X_j‖₂
where ‖X_j‖₂ is the L2 norm of input feature j over all N·L calibration tokens. Weights are
compared within each output row (the paper's per-output "comparison group"), the lowest are zeroed,
and the remaining weights are NOT updated: one forward pass per layer, no second-order solve.
"""

from __future__ import annotations

import time

import torch

from ..transform import all_or_nothing, check_count, replace_data
from ..walk import ColumnStats, calibration_walk, check_calibration
from .masks import (
    PruneReport,
    check_divisible,
    check_pruneable,
    check_sparsity,
    mask_for,
    record_prune,
    report,
    weight_linears,
)


def wanda_scores(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X‖₂ broadcast over rows (Wanda eq. 1).

    weight: [out_features, in_features]; norm: [in_features] -> scores [out_features, in_features]
    """
    return weight.detach().float().abs() * norm.float().to(weight.device)[None, :]


def wanda_mask(
    weight: torch.Tensor, norm: torch.Tensor, sparsity: float | None, pattern: str = "unstructured"
) -> torch.Tensor:
    """Prune mask (True = zeroed) of one matrix: lowest scores per row, or per N:M group."""
    sparsity, nm = check_sparsity(sparsity, pattern)
    return mask_for(wanda_scores(weight, norm), sparsity, nm, scope="row")


def _check_mask(pruned, weight: torch.Tensor, where: str) -> None:
    if not isinstance(pruned, torch.Tensor) or pruned.dtype != torch.bool or pruned.shape != weight.shape:
        got = (
            f"shape {tuple(pruned.shape)}, dtype {pruned.dtype}"
            if isinstance(pruned, torch.Tensor)
            else type(pruned).__name__
        )
        raise ValueError(
            f"mask returned {got} for {where}; it must return a bool tensor shaped like the weight "
            f"{tuple(weight.shape)} ([out, in]), True = pruned. The model is unchanged."
        )


@torch.no_grad()
@all_or_nothing
def wanda(
    model,
    calibration: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    device=None,
    batch_size: int = 8,
    mask=None,
) -> PruneReport:
    """Prune every decoder nn.Linear of `model` in place with Wanda.

    calibration: LongTensor [n_samples, seqlen] (labkit.data.calibration).
    sparsity: fraction zeroed in each row, in [0, 1); with pattern "N:M" it is 1 − N/M (pass None).
    pattern: "unstructured" (per output row) or "N:M" (N highest scores kept in each group of M).
    The layers are walked in order with labkit.walk.calibration_walk, so each layer's
    statistics come from the outputs of the already-pruned layers before it, as in the
    reference code.
    mask: None (labkit's wanda_mask) or your own function mask(weight [out, in], norm [in], sparsity) ->
    bool [out, in], True = pruned, with norm = ‖X_j‖₂ of each input feature (lesson 01's "build it");
    unstructured pattern only. A mask of another shape or dtype raises ValueError, the model unchanged.
    """
    sparsity, nm = check_sparsity(sparsity, pattern)
    if mask is not None and (not callable(mask) or nm is not None):
        raise ValueError(
            f"mask={mask!r}: pass a function mask(weight, norm, sparsity) -> bool mask, with the unstructured "
            f"pattern (got pattern={pattern!r}); or None for labkit's wanda_mask."
        )
    check_pruneable(model, "prune.wanda")
    check_divisible(weight_linears(model), nm)
    check_calibration(calibration, model)
    check_count(batch_size, "batch_size")
    start = time.perf_counter()

    def make_stats(name, linear):
        return ColumnStats(linear.in_features, device=linear.weight.device)

    def update(index, layer, stats):
        for name, linear in layer.named_modules():
            if name in stats:
                if mask is None:
                    pruned = mask_for(wanda_scores(linear.weight, stats[name].norm), sparsity, nm, scope="row")
                else:
                    pruned = mask(linear.weight.detach().clone(), stats[name].norm.clone(), sparsity)
                    _check_mask(pruned, linear.weight, f"layers.{index}.{name}")
                replace_data(linear.weight, linear.weight.masked_fill(pruned, 0))

    calibration_walk(model, calibration, make_stats, update, device=device, batch_size=batch_size, desc="wanda")
    record_prune(model, "wanda", pattern, sparsity)
    return report("wanda", pattern, sparsity, time.perf_counter() - start, model)
