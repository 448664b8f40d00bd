"""Worked solutions of lesson 06's exercises (see labkit.solutions)."""

from __future__ import annotations

import torch


def smoothing_factors(act_max, weights, alpha):
    """act_max: [in], max |X_j| over the calibration tokens; weights: the [out_i, in] matrices that read X.
    Returns s: [in], SmoothQuant's eq. 4."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)  # [in]
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)  # no 1 / 0 for a silent channel


def absmax_int8(x):
    scale = x.abs().max() / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def outlier_features(X, threshold):
    return (X.abs() >= threshold).any(dim=0)
