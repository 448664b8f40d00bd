"""Checks for lesson 03 (structured pruning): FLaP's unit scores (the lesson's "build it": prune.flap
runs them on the whole model), GQA head groups, bias compensation.

    check.lesson03.unit_scores(my_unit_scores)
    check.lesson03.kv_group_columns(my_kv_group_columns)
    check.lesson03.compensation_bias(my_compensation_bias)
"""

from __future__ import annotations

import torch

from . import Verdict, call, exercise, tensor_like


def _layer(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 6, generator=g)  # [out, in], square so that a row/column mix-up keeps the shape
    x = torch.randn(64, 6, generator=g) * torch.tensor([0.2, 1.0, 3.0, 0.5, 1.5, 0.1]) + torch.tensor(
        [1.0, -2.0, 0.5, 4.0, 0.0, 2.0]
    )  # x: [tokens, in], channels with different means and spreads
    return W, x


def _standardized(score: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    return (score - score.mean()) / score.std(unbiased=unbiased)


@exercise
def unit_scores(fn) -> bool:
    """fn(var [in], W [out, in], unit) -> [in // unit]: FLaP's score of each unit of `unit` consecutive
    input channels: S_j = var_j · ‖W[:, j]‖²₂ (the fluctuation, WIFV), standardized over all the layer's
    channels, z = (S − mean(S)) / std(S), then the mean z of each unit's channels (prune.flap runs it
    for every layer: unit = a KV group's columns of o_proj, and 1 for the MLP channels of down_proj)."""
    v = Verdict("unit_scores")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 12, generator=g)  # [out, in], square so that a row/column mix-up keeps the shape
    W[:, 4] *= 3.0  # a channel with heavy weights
    var = torch.rand(12, generator=g) * torch.tensor([0.2, 1.0, 3.0, 0.5, 1.5, 0.1] * 2)  # [in]
    population = False
    for unit in (4, 1, 3):
        got = call(v, fn, var.clone(), W.clone(), unit)
        score = var * W.pow(2).sum(0)
        expected = _standardized(score).view(-1, unit).mean(1)
        pop = _standardized(score, unbiased=False).view(-1, unit).mean(1)
        if (
            isinstance(got, torch.Tensor)
            and got.shape == pop.shape
            and torch.allclose(got.double(), pop.double(), 1e-4, 1e-5)
        ):
            population = True
            continue
        hints = {
            "summed the squared weights over a row (dim=1) instead of the column that channel j feeds (dim=0)": (
                _standardized(var * W.pow(2).sum(1)).view(-1, unit).mean(1)
            ),
            "used the column norm ‖W[:, j]‖, not its square": _standardized(var * W.norm(dim=0)).view(-1, unit).mean(1),
            "forgot to standardize: (S − mean) / std over the layer's channels puts layers and modules on one scale": (
                score.view(-1, unit).mean(1)
            ),
            "divided by the variance of the scores, not their standard deviation": (
                ((score - score.mean()) / score.var()).view(-1, unit).mean(1)
            ),
            "forgot to subtract the mean before dividing by the standard deviation": (score / score.std())
            .view(-1, unit)
            .mean(1),
        }
        if unit > 1:
            hints |= {
                "standardized within each unit: standardize over all the layer's channels, then average per unit": (
                    torch.stack([_standardized(u) for u in score.view(-1, unit)]).mean(1)
                ),
                "averaged the raw scores per unit and standardized those: standardize the channels first": (
                    _standardized(score.view(-1, unit).mean(1))
                ),
                "summed each unit's z instead of averaging them": _standardized(score).view(-1, unit).sum(1),
                "took every (in // unit)-th channel (interleaved): a unit owns `unit` consecutive channels": (
                    _standardized(score).view(unit, -1).mean(0)
                ),
            }
        if not tensor_like(v, got, expected, f"the scores for unit = {unit}", hints=hints):
            break
    note = (
        " (with the population std, n; labkit and the authors' code use the sample std, n − 1.)" if population else ""
    )
    return v.report("Standardized fluctuation, one score per unit: all layers now compete on one scale." + note)


@exercise
def kv_group_columns(fn) -> bool:
    """fn(g, n_heads, n_kv_heads, head_dim) -> LongTensor of the o_proj columns (= q_proj rows) of KV group g."""
    v = Verdict("kv_group_columns")
    n_heads, n_kv, d = 6, 2, 2
    for g in range(n_kv):
        got = call(v, fn, g, n_heads, n_kv, d)
        if v.problem is not None:
            break
        if isinstance(got, (list, tuple)):
            got = torch.tensor(got)
        group = n_heads // n_kv
        heads = torch.arange(g * group, (g + 1) * group)
        expected = (heads[:, None] * d + torch.arange(d)).flatten()
        interleaved = torch.arange(g, n_heads, n_kv)
        if isinstance(got, torch.Tensor) and got.dim() == 1:
            got = got.sort().values
            if torch.equal(got.long(), heads):
                v.fail(
                    "it returned head indices, not channels: head h owns the columns h·head_dim … "
                    "h·head_dim + head_dim − 1 of o_proj (and the same rows of q_proj)."
                )
                break
        tensor_like(
            v,
            got,
            expected,
            f"the columns of KV group {g} (6 query heads, 2 KV heads, head_dim 2)",
            hints={
                "took the interleaved query heads g, g + n_kv, g + 2·n_kv (LLM-Pruner's public code does); "
                "transformers' "
                "repeat_kv gives KV head g to the consecutive query heads g·group … g·group + group − 1": (
                    interleaved[:, None] * d + torch.arange(d)
                )
                .flatten()
                .sort()
                .values,
            },
        )
    return v.report("A whole group goes: 3 query heads' columns of o_proj and rows of q_proj, one K and one V head.")


@exercise
def compensation_bias(fn) -> bool:
    """fn(W [out, in], x [tokens, in], removed [k]) -> [out]: W[:, removed] @ mean over tokens of x[:, removed]."""
    v = Verdict("compensation_bias")
    W, x = _layer(5)
    removed = torch.tensor([0, 3, 5])
    kept = torch.tensor([1, 2, 4])
    got = call(v, fn, W.clone(), x.clone(), removed.clone())
    mean = x.mean(0)
    expected = W[:, removed] @ mean[removed]
    tensor_like(
        v,
        got,
        expected,
        "the bias",
        hints={
            "used every input channel: only the removed channels' contribution is lost": W @ mean,
            "used the kept channels: the bias replaces what the removed channels contributed": W[:, kept] @ mean[kept],
            "subtracted it: the bias adds back the removed channels' average contribution": -expected,
            "took rows W[removed, :] instead of the columns W[:, removed] that the removed inputs feed": W[removed, :].T
            @ mean[removed],
        },
    )
    return v.report("The pruned layer now outputs W_kept x_kept + b, the best constant stand-in for W_R x_R.")


__all__ = ["compensation_bias", "kv_group_columns", "unit_scores"]
