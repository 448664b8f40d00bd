"""Checks for lesson 10 (fused kernels): count bytes, compute an arithmetic intensity, write RMSNorm.

check.lesson10.unfused_rmsnorm_residual_bytes(my_count)   # my_count(rows, hidden) -> bytes
check.lesson10.matmul_intensity(my_intensity)            # my_intensity(m, n, k, element_bytes)
check.lesson10.rms_norm(my_rms_norm)                      # my_rms_norm(x, weight, eps) -> y
"""

from __future__ import annotations

import math

import torch

from . import Verdict, as_number, call, exercise, number_like, tensor_like


def _hint(v: Verdict, got, exact: float, wrong: dict, rtol: float, where: str) -> None:
    """If `got` is off but matches a known wrong answer (within rtol), fail the verdict with its description."""
    value = as_number(got)
    if value is None or not math.isfinite(value) or abs(value - exact) <= rtol * abs(exact):
        return
    for description, w in wrong.items():
        if abs(value - w) <= rtol * abs(w):
            v.fail(f"{where} {value:,.4g}; it looks like you {description}.")
            return


# --- exercise 1: bytes moved by an unfused RMSNorm + residual -------------------------------------------


def eager_rmsnorm_residual(x, residual, weight, eps):
    """The eager code of the exercise (fp32 throughout): seven PyTorch ops, seven kernels."""
    h = x + residual
    variance = h.pow(2).mean(-1, keepdim=True)  # [rows, 1]
    return weight * (h * torch.rsqrt(variance + eps)), h


def counted_bytes(rows: int, hidden: int) -> int:
    """What labkit.kernels.roofline.count_traffic measures for eager_rmsnorm_residual (meta tensors)."""
    from ..kernels import roofline

    x, r = (torch.empty(rows, hidden, device="meta") for _ in range(2))
    w = torch.empty(hidden, device="meta")
    return sum(op.total for op in roofline.count_traffic(eager_rmsnorm_residual, x, r, w, 1e-6))


@exercise
def unfused_rmsnorm_residual_bytes(fn) -> bool:
    """fn(rows, hidden) -> bytes read plus bytes written by the seven eager ops, in fp32."""
    v = Verdict("unfused_rmsnorm_residual_bytes")
    for rows, hidden in [(1, 4096), (16, 576), (512, 2048)]:
        got = call(v, fn, rows, hidden)
        if got is None:
            break
        exact, n = counted_bytes(rows, hidden), rows * hidden
        wrong = {
            "counted elements, not bytes (each fp32 element is 4 bytes)": exact / 4,
            "counted only what the ops read (each op also writes its result)": 4 * (6 * n + 3 * rows + hidden),
            "counted only what the ops write (each op also reads its inputs)": 4 * (4 * n + 3 * rows),
            "left out the weight (the last multiply reads it: hidden values)": exact - 4 * hidden,
            "counted one fused kernel (x, residual, weight read once; y, h written once), not the seven eager ops": 4
            * (4 * n + hidden),
        }
        _hint(v, got, exact, wrong, 0.01, f"for rows={rows}, hidden={hidden} you return")
        # Within 1%: the per-row statistics ([rows, 1] tensors) are a rounding error; the weight is not.
        if not number_like(v, got, exact, f"bytes for rows={rows}, hidden={hidden}", rtol=0.01):
            break
    return v.report("Seven kernels move about 10 elements per input element, against 4 for a fused kernel.")


# --- exercise 2: arithmetic intensity of a matmul -------------------------------------------------------


@exercise
def matmul_intensity(fn) -> bool:
    """fn(m, n, k, element_bytes) -> FLOP per byte of y [m, n] = x [m, k] · W[n, k]ᵀ, each tensor moved once."""
    v = Verdict("matmul_intensity")
    for m, n, k, b in [(1, 4096, 4096, 2), (16, 11008, 4096, 2), (2048, 4096, 4096, 2), (7, 64, 96, 4)]:
        got = call(v, fn, m, n, k, b)
        if got is None:
            break
        flops, nbytes = 2 * m * n * k, (m * k + n * k + m * n) * b
        exact = flops / nbytes
        wrong = {
            "counted one FLOP per multiply-add (a multiply and an add are two)": exact / 2,
            "counted only the weight's bytes (x is read and y written too)": flops / (n * k * b),
            "left out writing y": flops / ((m * k + n * k) * b),
            "counted elements, not bytes": flops / (nbytes / b),
            "divided bytes by FLOPs (intensity is FLOPs per byte)": nbytes / flops,
        }
        _hint(v, got, exact, wrong, 1e-3, f"for m={m}, n={n}, k={k}, {b}-byte elements you return")
        if not number_like(v, got, exact, f"the intensity for m={m}, n={n}, k={k}, {b}-byte elements"):
            break
    return v.report("One token (m=1) in fp16 does about 1 FLOP per byte: far below any GPU's ridge point.")


# --- exercise 3: RMSNorm in torch ----------------------------------------------------------------------------


def _reference(x, weight, eps):
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


@exercise
def rms_norm(fn) -> bool:
    """fn(x, weight, eps) -> y = x / sqrt(mean(x²) + eps) · weight over the last dimension, in x's dtype."""
    v = Verdict("rms_norm")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 8, generator=g) + 0.5  # a non-zero mean, so LayerNorm differs from RMSNorm
    x[2] *= 0.05  # a small row: there eps matters
    weight = 1 + 0.5 * torch.randn(8, generator=g)
    eps = 0.01
    xf = x.float()
    ms = xf.pow(2).mean(-1, keepdim=True)
    hints = {
        "subtracted the mean (that is LayerNorm; RMSNorm does not centre x)": weight
        * (xf - xf.mean(-1, keepdim=True))
        * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps),
        "left out eps (it keeps small rows from blowing up)": weight * xf * torch.rsqrt(ms),
        "added eps after the square root instead of inside it": weight * xf / (ms.sqrt() + eps),
        "forgot to multiply by the weight": xf * torch.rsqrt(ms + eps),
        "summed the squares instead of averaging them": weight
        * xf
        * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps),
        "multiplied by the RMS instead of dividing by it": weight * xf * torch.sqrt(ms + eps),
        "normalised over the wrong dimension (rows, not the hidden dimension)": weight
        * xf
        * torch.rsqrt(xf.pow(2).mean(0, keepdim=True) + eps),
    }
    got = call(v, fn, x.clone(), weight.clone(), eps)
    if got is not None and tensor_like(v, got, _reference(x, weight, eps), "y", atol=1e-5, hints=hints):
        half = x.half()
        got16 = call(v, fn, half, weight.half(), eps)
        if got16 is not None and isinstance(got16, torch.Tensor) and got16.dtype != torch.float16:
            v.fail(
                f"for an fp16 x the result is {got16.dtype}; return x's dtype (compute the statistics in "
                f"fp32, then cast back, as transformers' LlamaRMSNorm does)."
            )
        elif got16 is not None:
            tensor_like(v, got16, _reference(half, weight.half(), eps), "y for an fp16 x", atol=2e-3, rtol=2e-3)
    return v.report("Same formula as transformers' LlamaRMSNorm and labkit.kernels.rms_norm_torch.")
