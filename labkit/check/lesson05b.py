"""Checks for lesson 05b (AWQ and QLoRA): AWQ's loss for one candidate scale (the lesson's "build it":
quant.awq searches alpha with it on the whole model). It runs the learner's function on small hand-made
tensors."""

from __future__ import annotations

import torch

from ..quant.formats import fake_quantize
from . import Verdict, as_number, call, exercise, number_like


def _layer():
    """W [4, 8] and H = 2/n XᵀX from 64 tokens in which input channel 2 is loud; s from s_X^0.5."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(64, 8, generator=g)
    X[:, 2] *= 12
    W = torch.randn(4, 8, generator=g) * 0.2
    H = 2 * X.T @ X / X.shape[0]
    s = X.abs().mean(0).pow(0.5)
    return W, H, s / (s.max() * s.min()).sqrt()


def _trace(delta, H):  # tr(Δ H Δᵀ) / 2: the output error per token
    return (((delta @ H) * delta).sum() / 2).item()


@exercise
def scaled_error(fn) -> bool:
    """fn(W [out, in], H [in, in], s [in], bits, group_size) -> float: the output error per token of quantizing W
    with input scales s (AWQ eq. 5): with Δ = (Q(W diag s) − W diag s) diag(s)⁻¹, return tr(Δ H Δᵀ) / 2,
    where Q is round-to-nearest (quant.formats.fake_quantize with bits and group_size) and H = 2/n · Σ x xᵀ."""
    v = Verdict("scaled_error")
    W, H, s = _layer()
    bits, group_size = 3, 4
    got = call(v, fn, W.clone(), H.clone(), s.clone(), bits, group_size)
    if v.problem is not None:
        return v.report()
    Ws = W * s
    delta = (fake_quantize(Ws, bits, group_size) - Ws) / s
    expected = _trace(delta, H)
    if not number_like(v, got, expected, "the error", rtol=1e-4):
        value = as_number(got)  # None for what is not one real number
        hints = {
            "did not divide the error by s: Q(W·s) − W·s is the error on the scaled input X / s, so divide by s to "
            "get the error on X": _trace(fake_quantize(Ws, bits, group_size) - Ws, H),
            "quantized W itself instead of W · diag(s) (that is plain round-to-nearest, alpha = 0)": _trace(
                fake_quantize(W, bits, group_size) - W, H
            ),
            "multiplied the columns by 1 / s instead of s": _trace(
                (fake_quantize(W / s, bits, group_size) - W / s) * s, H
            ),
            "forgot the 1/2: H = 2/n · XᵀX, so ‖ΔX‖² / n = tr(Δ H Δᵀ) / 2": 2 * expected,
            "used only the diagonal of H: the cross terms between input channels count too": (
                (delta**2 * H.diagonal()).sum() / 2
            ).item(),
        }
        if value is not None:
            for description, wrong in hints.items():
                if abs(value - wrong) <= 1e-4 * abs(wrong):
                    v.problem = f"the error is wrong: it looks like you {description}."
                    break
    return v.report("quant.awq searches alpha with it: the error of each candidate s, from H alone.")
