"""Magnitude pruning: zero the weights with the smallest |W_ij|, no calibration data.

The baseline of the SparseGPT and Wanda papers. It ignores the inputs: a small weight on a
channel with huge activations matters more than a large weight on a quiet one, which is why it
collapses on LLMs at 50% (both papers' LLaMA/OPT tables; on SmolLM2-135M too).

scope="layer": each decoder linear loses round(sparsity · numel) weights (the papers' layer-wise baseline).
scope="row": each output row loses round(sparsity · in_features) weights (Wanda's comparison group).
scope="global": one threshold over all decoder linears together; layers end up unevenly sparse.
"""

from __future__ import annotations

import time

import torch

from ..transform import all_or_nothing, replace_data
from .masks import (
    SCOPES,
    PruneReport,
    check_divisible,
    check_pruneable,
    check_sparsity,
    lowest_masks,
    mask_for,
    n_pruned,
    record_prune,
    report,
    weight_linears,
)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float | None, pattern: str = "unstructured", scope: str = "layer"
) -> torch.Tensor:
    """Prune mask (True = zeroed) of one matrix by |W|. weight: [out_features, in_features]."""
    sparsity, nm = check_sparsity(sparsity, pattern)
    _check_scope(scope, nm)
    return mask_for(weight.detach().float().abs(), sparsity, nm, scope)


@torch.no_grad()
@all_or_nothing
def magnitude(model, sparsity: float | None = None, pattern: str = "unstructured", scope: str = "layer") -> PruneReport:
    """Prune every decoder nn.Linear of `model` in place by weight magnitude.

    sparsity: fraction of weights zeroed, in [0, 1); with pattern "N:M" it is 1 − N/M (pass None).
    pattern: "unstructured" or "N:M" (N of every M consecutive input weights of a row kept).
    scope: "layer", "row" or "global" (unstructured only; see the module docstring).
    """
    sparsity, nm = check_sparsity(sparsity, pattern)
    _check_scope(scope, nm)
    check_pruneable(model, "prune.magnitude")
    linears = weight_linears(model)
    check_divisible(linears, nm)
    start = time.perf_counter()
    if scope == "global" and nm is None:
        weights = [lin.weight for lin in linears.values()]  # each W: [out_features, in_features]
        k = n_pruned(sparsity, sum(w.numel() for w in weights))
        # one threshold over all weights, found without concatenating them (7B: 6.5e9 values); the masks
        # are made one matrix at a time, each just before its matrix is pruned
        for w, mask in zip(weights, lowest_masks(weights, k, score=torch.abs)):
            replace_data(w, w.masked_fill(mask, 0))
    else:
        for lin in linears.values():
            replace_data(lin.weight, lin.weight.masked_fill(mask_for(lin.weight.float().abs(), sparsity, nm, scope), 0))
    record_prune(model, "magnitude", pattern, sparsity)
    return report("magnitude", pattern, sparsity, time.perf_counter() - start, model)


def _check_scope(scope: str, nm) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: allowed scopes are {SCOPES}.")
    if nm is not None and scope == "global":
        raise ValueError(
            "scope='global' applies to unstructured pruning only: an N:M pattern always "
            "chooses within each group of M weights. Use scope='layer' with N:M."
        )
