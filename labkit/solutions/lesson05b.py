"""Worked solutions of lesson 05b's exercises."""

from __future__ import annotations

from ..quant.formats import fake_quantize


def scaled_error(W, H, s, bits, group_size):
    """W: [out, in]; H: [in, in] = 2/n · Σ x xᵀ; s: [in]. The output error per token of AWQ's candidate s (eq. 5)."""
    Ws = W.float() * s[None, :]  # scale input channel j of every row by s_j
    delta = (fake_quantize(Ws, bits, group_size) - Ws) / s[None, :]  # the error on the original X (its input is X / s)
    return ((delta @ H) * delta).sum().item() / 2  # ‖Δ X‖² / n = tr(Δ H Δᵀ) / 2
