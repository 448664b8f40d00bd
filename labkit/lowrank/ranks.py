"""Automatic per-layer ranks under one global parameter budget.

A uniform ratio gives every linear the same fraction of its parameters. But layers differ: some
whitened spectra fall off fast (a few directions carry the output), others are flat. Greedy
allocation on the measured spectra:

    start every linear at its break-even rank min(full rank, ⌊in·out/(in+out)⌋): above it the
        factors would hold more parameters than the dense matrix
    cost of dropping singular value i of linear l:  (σ_li² / Σ_j σ_lj²) / (in_l + out_l)
        = its share of the layer's output energy (the relative output error it adds, see
          svd.py), per parameter saved (one rank holds in + out parameters)
    repeatedly drop the cheapest singular value of all linears (never a linear's last one)
    until Σ_l r_l · (in_l + out_l) <= budget · Σ_l in_l · out_l

Since each spectrum is sorted, the costs inside a linear rise as its rank falls, so the greedy
order is one global sort. Normalising by Σσ² makes layers with large activations (and so large
absolute errors) comparable with the rest: every linear's error counts relative to its output.

The budget is met exactly up to one rank step: the kept parameters are at most
budget · total and fall short of it by less than the in + out of the last linear cut (at most
576 + 1536 = 2,112 parameters on SmolLM2-135M, 0.002% of its decoder linears). The one
exception is a budget above Σ break-even · (in + out) / total (0.998 on SmolLM2-135M): then every linear
simply keeps its break-even rank.

A greedy on a layer-local proxy is not guaranteed to beat uniform ranks end to end: on
SmolLM2-135M at budget 0.8 (8 × 512 calibration tokens) it cuts the summed relative output
error from 4.57 (uniform) to 2.98, yet its perplexity is worse: 281 against 199 (first 16
windows of 512 tokens; dense 36.5), and it leaves one down_proj at rank 1. Massive activations make a few
tokens dominate X Xᵀ, so a layer can look "explained" by one direction while the other tokens still need
the rest: compare allocations on perplexity, not on the proxy. Floors at 50% or 75% of the
uniform rank, and absolute instead of relative errors, do not repair it on that model
(benchmarks/bench_rank_allocation.py measures every variant). sensitivity.py measures the damage
end to end instead, and does beat uniform ranks there.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ..walk import Hessian, calibration_walk
from .svd import discarded, factor_targets, linalg_svd, rank_for_ratio, whitening


@dataclass
class RankAllocation:
    ranks: dict[str, int]  # name -> rank: pass to labkit.lowrank.svd(model, rank=allocation.ranks, ...)
    budget: float  # fraction of the factored linears' parameters to keep
    params_before: int  # Σ in · out of the linears
    params_after: int  # Σ rank · (in + out)
    predicted: float  # Σ over linears of Σ_{i>r} σ_i² / Σ σ_i² (the relative errors the allocation accepts)
    uniform: dict[str, int] = field(repr=False)  # the uniform ranks at the same budget (param_ratio=budget)
    uniform_params: int = 0
    uniform_predicted: float = 0.0
    spectra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # σ of W S (or of W) per linear

    @property
    def kept(self) -> float:
        return self.params_after / self.params_before


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget < 1:
        raise ValueError(
            f"budget={budget!r}: need the fraction of the factored linears' parameters to keep, "
            f"in (0, 1) (0.8 removes 20%)."
        )
    return float(budget)


def break_even(out_features: int, in_features: int) -> int:
    """Largest rank whose factors hold no more parameters than the dense matrix: ⌊in·out / (in + out)⌋."""
    return max(1, out_features * in_features // (out_features + in_features))


def greedy_ranks(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    budget: float,
    min_ranks: dict[str, int] | None = None,
    relative: bool = True,
) -> dict[str, int]:
    """Global greedy allocation (module docstring). spectra: name -> singular values [min(out, in)]
    sorted descending; shapes: name -> (out, in). Returns name -> rank (at least 1).

    Variants (benchmarks/bench_rank_allocation.py compares them on the real model):
    min_ranks: name -> the lowest rank greedy may give that linear (default 1);
    relative=False: cost σ_i² / (in + out), the absolute output error, not its share of Σσ²."""
    budget = check_budget(budget)
    min_ranks = min_ranks or {}
    unknown = sorted(set(min_ranks) - set(spectra))
    if unknown:
        raise ValueError(f"min_ranks names {unknown[:3]} have no spectrum; names look like {list(spectra)[:2]}.")
    total = sum(out * inp for out, inp in shapes.values())
    target = budget * total
    floor = {
        name: max(1, min(min_ranks.get(name, 1), break_even(*shapes[name]), spectra[name].numel())) for name in spectra
    }
    smallest = sum(floor[name] * sum(shapes[name]) for name in spectra)  # every linear at its floor
    if smallest > target:
        raise ValueError(
            f"budget={budget:g} keeps {target:,.0f} parameters, but even the lowest ranks allowed "
            f"(1, or min_ranks) need {smallest:,} ({smallest / total:.4f} of {total:,}): no allocation "
            f"can meet it. Use a budget of at least {smallest / total:.4f}, or factor fewer linears."
        )
    names = list(spectra)
    ranks = {name: min(spectra[name].numel(), break_even(*shapes[name])) for name in names}
    params = sum(ranks[n] * sum(shapes[n]) for n in names)
    costs, owners, steps = [], [], []
    for k, name in enumerate(names):
        squares = spectra[name].double() ** 2
        share = squares / squares.sum().clamp_min(1e-300) if relative else squares  # share of the layer's energy
        step = sum(shapes[name])  # parameters of one rank: in + out
        candidates = share[floor[name] : ranks[name]]  # every kept singular value above the floor may go
        costs.append(candidates / step)
        owners.append(torch.full((candidates.numel(),), k))
        steps.append(torch.full((candidates.numel(),), step, dtype=torch.float64))
    costs, owners, steps = torch.cat(costs), torch.cat(owners), torch.cat(steps)
    order = torch.argsort(costs, stable=True)  # cheapest first
    if params > target:
        saved = steps[order].cumsum(0)
        n_cut = int(torch.searchsorted(saved, params - target)) + 1  # first prefix that saves enough
        for k, count in zip(*owners[order[:n_cut]].unique(return_counts=True)):
            ranks[names[int(k)]] -= int(count)
    return ranks


def measure_spectra(
    model, calibration: torch.Tensor | None, targets=None, percdamp: float = 0.0, device=None, batch_size: int = 8
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Singular values of W S per linear (whitened with X Xᵀ on the calibration walk, model unchanged),
    or of W when calibration is None. Returns (name -> σ [min(out, in)], name -> (out, in))."""
    linears = factor_targets(model, targets)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
    if calibration is None:
        spectra = {name: linalg_svd(lin.weight.detach().float(), values_only=True) for name, lin in linears.items()}
        return {name: s.cpu() for name, s in spectra.items()}, shapes
    chosen = {id(linear) for linear in linears.values()}
    spectra: dict[str, torch.Tensor] = {}

    def make_stats(name, linear):
        return Hessian(linear.in_features, device=linear.weight.device) if id(linear) in chosen else None

    def update(index, layer, stats):
        for name, stat in stats.items():
            W = layer.get_submodule(name).weight.detach().double()
            s = linalg_svd(W @ whitening(stat.H, percdamp), values_only=True)
            spectra[f"layers.{index}.{name}"] = s.float().cpu()

    calibration_walk(model, calibration, make_stats, update, device=device, batch_size=batch_size, desc="spectra")
    return {name: spectra[name] for name in linears}, shapes


def allocate_ranks(
    model,
    calibration: torch.Tensor | None,
    budget: float,
    targets=None,
    percdamp: float = 0.0,
    device=None,
    batch_size: int = 8,
) -> RankAllocation:
    """Per-linear ranks keeping `budget` of the factored linears' parameters, by global greedy on the
    normalized whitened spectra (module docstring); calibration=None uses the spectra of W itself.

    Returns a RankAllocation with the ranks, the uniform ranks at the same budget, and each
    one's predicted error Σ_l Σ_{i>r_l} σ_li² / Σ_i σ_li². Apply with
    labkit.lowrank.svd(model, rank=allocation.ranks, activation_aware=True, calibration=...).
    """
    budget = check_budget(budget)
    spectra, shapes = measure_spectra(model, calibration, targets, percdamp, device, batch_size)
    ranks = greedy_ranks(spectra, shapes, budget)
    uniform = {name: rank_for_ratio(inp, out, budget) for name, (out, inp) in shapes.items()}

    def count(r):
        return sum(r[name] * (out + inp) for name, (out, inp) in shapes.items())

    def predicted(r):
        return sum(discarded(spectra[name], r[name]) for name in shapes)

    return RankAllocation(
        ranks,
        budget,
        sum(out * inp for out, inp in shapes.values()),
        count(ranks),
        predicted(ranks),
        uniform,
        count(uniform),
        predicted(uniform),
        spectra,
    )


__all__ = ["RankAllocation", "allocate_ranks", "break_even", "check_budget", "greedy_ranks", "measure_spectra"]
