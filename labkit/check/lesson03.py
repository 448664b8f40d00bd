"""Checks for lesson 03 (structured pruning): FLaP's fluctuation score, GQA head groups, bias compensation."""

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


@exercise
def fluctuation_score(fn) -> bool:
    """fn(x [tokens, in], W [out, in]) -> [in]: Var_tokens(x_j) · ‖W[:, j]‖²₂ (FLaP's WIFV)."""
    v = Verdict("fluctuation_score")
    W, x = _layer()
    got = call(v, fn, x.clone(), W.clone())
    column_energy = W.pow(2).sum(0)
    expected = x.var(0, unbiased=False) * column_energy
    unbiased = x.var(0, unbiased=True) * column_energy  # the sample variance is fine as well
    if (
        isinstance(got, torch.Tensor)
        and got.shape == unbiased.shape
        and torch.allclose(got.double(), unbiased.double(), rtol=1e-4, atol=1e-5)
    ):
        return v.report("(with the sample variance, n − 1; the ranking is the same.)")
    tensor_like(
        v,
        got,
        expected,
        "the score",
        hints={
            "summed the squared weights over a row (dim=1) instead of the column that channel j feeds (dim=0)": x.var(
                0, unbiased=False
            )
            * W.pow(2).sum(1),
            "used the column norm ‖W[:, j]‖, not its square": x.var(0, unbiased=False) * W.norm(dim=0),
            "used the mean square of x (its second moment), not its variance: subtract the channel's mean first": x.pow(
                2
            ).mean(0)
            * column_energy,
            "used the variance over channels of each token instead of over tokens of each channel": x.var(
                1, unbiased=False
            )[:6]
            * column_energy,
        },
    )
    return v.report("A channel that barely fluctuates can be replaced by its mean.")


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


__all__ = ["compensation_bias", "fluctuation_score", "kv_group_columns"]
