"""Rank allocation by measured sensitivity: one kept fraction per kind of linear, chosen end to end.

The greedy of ranks.py trusts a layer-local proxy, and on SmolLM2-135M that proxy misleads it
(see its docstring). ASVD's remedy is to *measure*: truncate, run the model, read the loss. Doing
that for each of 210 linears at several ratios is too slow, so this allocation measures per kind
of linear (q, k, v, o, gate, up, down: 7 kinds, every decoder layer alike):

    for each kind k and each ratio ρ in `ratios`:
        Δ_k(ρ) = loss(model with every k-linear factored at ρ, SVD-LLM) − loss(dense)   on `probe` tokens
    choose one ρ_k per kind minimising Σ_k Δ_k(ρ_k)
        subject to Σ_k params_k(ρ_k) <= budget · Σ_k params_k(1)

assuming the kinds' damages add up (exhaustive search: len(ratios)^7 combinations, instant). Cost:
7 · len(ratios) whitened factorizations and loss evaluations, each on a copy of the model (about
13 minutes for SmolLM2-135M on two CPU cores with 4 ratios; benchmarks/bench_rank_allocation.py).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from ..walk import check_calibration
from .ranks import check_budget
from .svd import TARGETS, factor_targets, rank_for_ratio, svd


@dataclass
class SensitivityAllocation:
    ratios: dict[str, float]  # kind -> kept fraction of its parameters
    ranks: dict[str, int]  # name -> rank: pass to labkit.lowrank.svd(model, rank=..., activation_aware=True, ...)
    kept: float  # fraction of the factored linears' parameters kept
    predicted: float  # Σ_k Δ_k(ρ_k): the summed loss increase the choice expects (nats/token)
    sensitivity: dict[tuple[str, float], float] = field(repr=False)  # (kind, ratio) -> measured Δ loss


@torch.no_grad()
def mean_loss(model, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats/token) over tokens [n, seqlen], one sample at a time."""
    device = next(model.parameters()).device
    losses = [model(row[None].to(device), labels=row[None].to(device)).loss.item() for row in tokens]
    return sum(losses) / len(losses)


def allocate_by_sensitivity(
    model,
    calibration: torch.Tensor,
    budget: float,
    probe: torch.Tensor,
    ratios=(0.5, 0.65, 0.8, 0.95),
    kinds=TARGETS,
    device=None,
) -> SensitivityAllocation:
    """Per-kind kept fractions under one parameter budget, from measured loss increases (module docstring).

    calibration: token ids [n, seqlen] for the SVD-LLM whitening; probe: other token ids [m, seqlen]
    on which the loss is measured (not the test split). The model is not changed."""
    budget = check_budget(budget)
    check_calibration(calibration, model)
    check_calibration(probe, model)
    ratios = sorted({float(r) for r in ratios})
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios={ratios}: need kept fractions in (0, 1], e.g. (0.5, 0.65, 0.8, 0.95).")
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in factor_targets(model, kinds).items()}
    of_kind = {k: [n for n in shapes if n.endswith("." + k)] for k in kinds}

    def kept(kind, ratio):  # parameters of every linear of that kind at that ratio (full ratio: dense)
        return sum(
            rank_for_ratio(i, o, ratio) * (i + o) if ratio < 1 else o * i for o, i in (shapes[n] for n in of_kind[kind])
        )

    total = sum(o * i for o, i in shapes.values())
    smallest = sum(kept(k, ratios[0]) for k in kinds)
    if smallest > budget * total:
        raise ValueError(
            f"budget={budget:g}: even the smallest ratio {ratios[0]:g} for every kind keeps "
            f"{smallest / total:.4f} of the parameters; add a smaller ratio or raise the budget."
        )
    base = mean_loss(model, probe)
    sensitivity = {}
    for kind in kinds:
        for ratio in ratios:
            if ratio == 1:
                sensitivity[kind, ratio] = 0.0
                continue
            trial = copy.deepcopy(model)
            svd(trial, param_ratio=ratio, activation_aware=True, calibration=calibration, targets=[kind], device=device)
            sensitivity[kind, ratio] = mean_loss(trial, probe) - base
            del trial
    best = None
    for choice in itertools.product(ratios, repeat=len(kinds)):
        params = sum(kept(k, r) for k, r in zip(kinds, choice))
        if params > budget * total:
            continue
        cost = sum(sensitivity[k, r] for k, r in zip(kinds, choice))
        if best is None or cost < best[0]:
            best = (cost, choice, params)
    cost, choice, params = best
    chosen = dict(zip(kinds, choice))
    ranks = {
        n: rank_for_ratio(i, o, chosen[k]) for k in kinds if chosen[k] < 1 for n in of_kind[k] for o, i in [shapes[n]]
    }
    return SensitivityAllocation(chosen, ranks, params / total, cost, sensitivity)


__all__ = ["SensitivityAllocation", "allocate_by_sensitivity", "mean_loss"]
