"""Checks for lesson 06 (activation quantization): absmax int8, LLM.int8()'s outlier features, and
SmoothQuant's smoothing factors (the lesson's "build it": quant.smooth runs them on the whole model).
Each runs the learner's function on small hand-made tensors."""

from __future__ import annotations

import torch

from . import Verdict, call, exercise, number_like, tensor_like


def _vector() -> torch.Tensor:
    # values chosen so that rounding, truncation and a 128-level scale all give different codes
    return torch.tensor([0.3, -1.7, 2.54, 0.05, -0.96, 1.21, -2.9, 0.0])


@exercise
def absmax_int8(fn) -> bool:
    """fn(x [n] float) -> (q [n] int8, scale: float or 0-d tensor), with x ≈ scale · q and
    scale = max|x| / 127 (symmetric absmax int8, LLM.int8() eq. 1)."""
    v = Verdict("absmax_int8")
    x = _vector()
    got = call(v, fn, x.clone())
    if v.problem is None and not (isinstance(got, tuple) and len(got) == 2):
        v.fail(f"should return a pair (q, scale); got {type(got).__name__}.")
    if v.problem is not None:
        return v.report()
    q, scale = got
    absmax = x.abs().max()
    expected_scale = absmax / 127
    if isinstance(q, torch.Tensor) and q.dtype != torch.int8 and not q.is_floating_point():
        v.fail(f"q has dtype {q.dtype}; int8 codes fit in torch.int8 (use .to(torch.int8)).")
    if isinstance(q, torch.Tensor) and q.is_floating_point():
        v.fail("q is a float tensor: round, clamp to [-127, 127] and convert with .to(torch.int8).")
    number_like(v, scale, expected_scale.item(), "scale", rtol=1e-4)
    if v.problem is not None and "scale is" in v.problem:
        value = float(scale)
        if abs(value - absmax.item() / 128) < 1e-6:
            v.problem = "scale is max|x| / 128: the symmetric int8 grid is [-127, 127], so divide by 127."
        elif abs(value - x.max().item() / 127) < 1e-6:
            v.problem = "scale uses max(x), not max(|x|): the most negative value (-2.9) must fit too."
        elif abs(value - 127 / absmax.item()) < 1e-6:
            v.problem = "scale is 127 / max|x|, the inverse: x ≈ scale · q needs scale = max|x| / 127."
    expected_q = torch.round(x / expected_scale).to(torch.int8)
    tensor_like(
        v,
        q,
        expected_q,
        "q",
        atol=0,
        rtol=0,
        hints={
            "truncated x / scale towards zero instead of rounding to nearest": torch.trunc(x / expected_scale).to(
                torch.int8
            ),
            "took floor(x / scale) instead of rounding to nearest": torch.floor(x / expected_scale).to(torch.int8),
        },
    )
    return v.report("Dequantized, scale · q is within scale / 2 of x.")


@exercise
def outlier_features(fn) -> bool:
    """fn(X [tokens, features], threshold) -> bool [features]: True for each feature (column) where
    any token has |x| >= threshold (LLM.int8()'s outlier dimensions)."""
    v = Verdict("outlier_features")
    X = torch.tensor(
        [[0.5, -7.0, 1.0, 0.2, 6.0], [0.1, -0.3, 2.0, 0.1, 0.4], [-0.2, 0.8, -1.5, 9.5, 0.3]]
    )  # 3 tokens, 5 features
    got = call(v, fn, X.clone(), 6.0)
    if v.problem is not None:
        return v.report()
    expected = (X.abs() >= 6.0).any(0)  # features 1, 3, 4
    tensor_like(
        v,
        got,
        expected,
        "the outlier mask",
        atol=0,
        rtol=0,
        hints={
            "compared x with the threshold, not |x| (the negative outlier -7.0 is missed)": (X >= 6.0).any(0),
            "used |x| > threshold: a value equal to the threshold (6.0) counts as an outlier": (X.abs() > 6.0).any(0),
            "required every token to exceed the threshold (all) instead of any token": (X.abs() >= 6.0).all(0),
        },
    )
    if v.problem and "shape (3,)" in v.problem:
        v.problem = "the mask has one entry per token (3); it should have one per feature (5): reduce over dim 0."
    return v.report("Features 1, 3 and 4 go through the 16-bit matmul.")


@exercise
def smoothing_factors(fn) -> bool:
    """fn(act_max [in], weights (a list of [out_i, in]), alpha) -> s [in]: SmoothQuant's eq. 4,
    s_j = max|X_j|^alpha / max|W_j|^(1 − alpha), max|W_j| over the rows of all the weights that read X
    (q, k and v share one s), both maxima and s clamped at 1e-5 (a channel that is never active)."""
    v = Verdict("smoothing_factors")
    act_max = torch.tensor([40.0, 1.0, 0.5, 8.0, 0.0])  # the last channel is never active
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(3, 5, generator=g) * 0.1, torch.randn(2, 5, generator=g) * 0.3]
    weights[1][:, 3] *= 10  # the second weight holds the larger values of channel 3
    for alpha in (0.75, 0.5):  # 0.75 first, so that swapped exponents show
        got = call(v, fn, act_max.clone(), [w.clone() for w in weights], alpha)
        if v.problem is not None:
            break
        w_all = torch.cat(weights).abs().amax(0).clamp(min=1e-5)  # [in]: over the rows of q, k and v together
        expected = (act_max.pow(alpha) / w_all.pow(1 - alpha)).clamp(min=1e-5)
        w_first = weights[0].abs().amax(0).clamp(min=1e-5)
        hints = {
            "swapped the exponents (alpha belongs to the activations, 1 − alpha to the weights)": (
                act_max.pow(1 - alpha) / w_all.pow(alpha)
            ).clamp(min=1e-5),
            "multiplied by max|W|^(1 − alpha) instead of dividing": (act_max.pow(alpha) * w_all.pow(1 - alpha)).clamp(
                min=1e-5
            ),
            "used the first weight's maximum only: q, k and v share one s, from the largest weight of the three "
            "in each column": (act_max.pow(alpha) / w_first.pow(1 - alpha)).clamp(min=1e-5),
            "forgot the clamp at 1e-5: a channel that is never active gets s = 0, and X / s = 0 / 0": act_max.pow(alpha)
            / w_all.pow(1 - alpha),
        }
        if not tensor_like(v, got, expected, f"s at alpha={alpha}", atol=1e-8, rtol=1e-5, hints=hints):
            break
    return v.report("After smoothing, max|X_j| / s_j and max|W_j| · s_j meet where alpha puts them.")
