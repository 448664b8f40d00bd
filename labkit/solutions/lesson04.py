"""Worked solutions of lesson 04's exercises (see labkit.solutions)."""

from __future__ import annotations

import math

import torch


def rtn_quantize(w, bits, group_size):
    """w: [out, in]; group_size: None (one grid per row) or a divisor of in. Returns codes [out, in] uint8
    and scale, zero [out, n_groups] fp32: asymmetric round-to-nearest, one grid per group."""
    maxq = 2**bits - 1
    out_features, in_features = w.shape
    groups = w.float().reshape(-1, group_size or in_features)  # [out * n_groups, group]: a row per grid
    lo, hi = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)  # 0.0 must lie on the grid
    empty = (lo == 0) & (hi == 0)  # an all-zero group: any scale works, avoid 0 / 0
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).half().float().clamp(min=2.0**-24)  # stored in fp16 (2^-24: its smallest step)
    zero = torch.round(-lo / scale).clamp(0, maxq)  # the integer zero point: code of 0.0
    codes = (torch.round(groups / scale[:, None]) + zero[:, None]).clamp(0, maxq).to(torch.uint8)
    return codes.reshape(out_features, in_features), scale.reshape(out_features, -1), zero.reshape(out_features, -1)


def quantize_asym(x, bits):
    maxq = 2**bits - 1
    scale = (x.max() - x.min()) / maxq
    zero = torch.round(-x.min() / scale)
    codes = (torch.round(x / scale) + zero).clamp(0, maxq)
    return codes.to(torch.uint8), scale * (codes - zero)


def pack_int4(codes):
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.numel() % 2))  # an even count
    return codes[0::2] | (codes[1::2] << 4)


def quantlinear_bytes(out_features, in_features, bits, group_size):
    groups = 1 if group_size is None else in_features // group_size
    return (
        math.ceil(out_features * in_features * bits / 8)  # packed codes
        + out_features * groups * 2  # fp16 scales
        + math.ceil(out_features * groups * bits / 8)  # packed zero points
    )
