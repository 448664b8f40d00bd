"""Low rank: replace a weight matrix by two thin ones, W ≈ B A, and keep what matters.

    from labkit import lowrank
    lowrank.svd(model, param_ratio=0.8)                                        # plain truncated SVD
    lowrank.svd(model, param_ratio=0.8, activation_aware=True, calibration=c)  # SVD-LLM whitening
    allocation = lowrank.allocate_ranks(model, c, budget=0.8)                  # per-layer ranks
    lowrank.svd(model, rank=allocation.ranks, activation_aware=True, calibration=c)
    lowrank.sparse_plus_lowrank(model, param_ratio=0.7, density=0.01)          # LoSparse: B A + S

svd.py (LowRankLinear, truncated_svd, whitened_svd), ranks.py (greedy global allocation on spectra),
sensitivity.py (one kept fraction per kind of linear, from measured loss increases),
sparse_plus_lowrank.py (SparsePlusLowRankLinear). Each returns a report of ranks and parameters.
"""

from .ranks import RankAllocation, allocate_ranks, break_even, check_budget, greedy_ranks, measure_spectra
from .sensitivity import SensitivityAllocation, allocate_by_sensitivity, mean_loss
from .sparse_plus_lowrank import (
    SparseLowRankReport,
    SparsePlusLowRankLinear,
    check_density,
    decompose,
    sparse_plus_lowrank,
)
from .svd import (
    TARGETS,
    LayerRank,
    LowRankLinear,
    LowRankReport,
    check_choice,
    check_rank,
    discarded,
    factor_targets,
    lowrank_linears,
    rank_for_energy,
    rank_for_ratio,
    svd,
    truncated_svd,
    truncation_errors,
    whitened_factors,
    whitened_svd,
    whitening,
)

__all__ = [
    "TARGETS",
    "LayerRank",
    "LowRankLinear",
    "LowRankReport",
    "RankAllocation",
    "SensitivityAllocation",
    "SparseLowRankReport",
    "SparsePlusLowRankLinear",
    "allocate_by_sensitivity",
    "allocate_ranks",
    "break_even",
    "check_budget",
    "check_choice",
    "check_density",
    "check_rank",
    "decompose",
    "discarded",
    "factor_targets",
    "greedy_ranks",
    "lowrank_linears",
    "mean_loss",
    "measure_spectra",
    "rank_for_energy",
    "rank_for_ratio",
    "sparse_plus_lowrank",
    "svd",
    "truncated_svd",
    "truncation_errors",
    "whitened_factors",
    "whitened_svd",
    "whitening",
]
