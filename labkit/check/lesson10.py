"""Checks for lesson 10 (fused kernels): the fused RMSNorm kernel in Triton (the lesson's "build it": the
fused model of section 6 runs it), the bytes an unfused RMSNorm moves, the arithmetic intensity of a matmul.

check.lesson10.rms_norm_kernel(my_kernel)                  # a @triton.jit kernel, labkit's signature
check.lesson10.unfused_rmsnorm_residual_bytes(my_count)   # my_count(rows, hidden) -> bytes
check.lesson10.matmul_intensity(my_intensity)            # my_intensity(m, n, k, element_bytes)
"""

from __future__ import annotations

import math

import torch

from . import Verdict, as_number, call, describe, exercise, number_like, tensor_like


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


def _wrong_rms(h, weight, eps, hidden_divisor=None, *, eps_outside=False, weighted=True, centred=False):
    """Known wrong RMSNorms, in fp32 (h: [rows, hidden]), for the hints."""
    h = h.float()
    if centred:
        h = h - h.mean(-1, keepdim=True)
    ms = h.pow(2).sum(-1, keepdim=True) / (hidden_divisor or h.shape[-1])
    normed = h / (ms.sqrt() + eps) if eps_outside else h / torch.sqrt(ms + eps)
    return normed * weight.float() if weighted else normed


@exercise
def rms_norm_kernel(fn) -> bool:
    """fn: a @triton.jit kernel with the signature of labkit.kernels.rms_norm_kernel,
    (out_ptr, x_ptr, residual_ptr, residual_out_ptr, weight_ptr, hidden, eps, HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr), launched with one program per row of a contiguous [rows, hidden] x and BLOCK =
    hidden rounded up to a power of 2: with HAS_RESIDUAL, h = x + residual is stored to residual_out_ptr
    (rounded to x's dtype) and normalised; y = h / sqrt(mean(h²) + eps) · weight (statistics in fp32,
    rounded to the output dtype before the weight) is stored to out_ptr. Runs where Triton runs: a CUDA
    GPU, or the CPU with TRITON_INTERPRET=1 set before labkit.kernels is imported."""
    from ..kernels import _triton, fused

    v = Verdict("rms_norm_kernel")
    if not (_triton.available() and (_triton.interpreted() or torch.cuda.is_available())):
        v.fail(
            "a Triton kernel runs on a CUDA GPU or in Triton's CPU interpreter; set TRITON_INTERPRET=1 before "
            "importing labkit.kernels (the lesson's first cells do) and restart the kernel."
        )
        return v.report()
    if not (callable(getattr(fn, "__getitem__", None)) and hasattr(fn, "fn")):
        v.fail(
            f"pass a Triton kernel: decorate your function with @triton.jit (got {describe(fn)}); it is launched "
            f"as kernel[(rows,)](out, x, residual, residual_out, weight, hidden, eps, HAS_RESIDUAL=..., BLOCK=...)."
        )
        return v.report()
    device = _triton.device()
    g = torch.Generator().manual_seed(10)
    cases = [(3, 203, torch.float32, True), (2, 64, torch.float32, False), (4, 96, torch.float16, True)]
    for rows, hidden, dtype, with_residual in cases:
        x = (torch.randn(rows, hidden, generator=g) + 0.5).to(dtype)  # a non-zero mean: LayerNorm differs
        x[-1] *= 0.05  # a small row: there eps matters
        r = torch.randn(rows, hidden, generator=g).to(dtype) if with_residual else None
        w = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
        eps = 0.01
        on = [t.to(device) if t is not None else None for t in (x, r, w)]
        what = f"{rows} rows of {hidden}, {str(dtype)[6:]}, {'with' if with_residual else 'without'} the residual"
        try:
            got = fused.rms_norm(on[0], on[2], eps, residual=on[1], backend="triton", kernel=fn)
        except Exception as error:  # the learner's kernel: a compile or launch error, in words
            v.fail(f"launching it on {what} raised {type(error).__name__}: {str(error)[:300]}")
            return v.report()
        y, h = got if with_residual else (got, None)
        y, h = y.cpu(), h.cpu() if h is not None else None
        if torch.isnan(y).all() and (h is None or torch.isnan(h).all()):
            v.fail("not written yet: your kernel stored nothing (both outputs start as NaN and stayed NaN).")
            return v.report()
        expected_h = x + r if with_residual else x
        if with_residual and torch.isnan(h).all():
            v.fail(
                f"on {what}: h = x + residual was never stored; store it to residual_out_ptr (the new residual "
                f"stream, the second output) and normalise it."
            )
            return v.report()
        if with_residual and not tensor_like(v, h, expected_h, f"h on {what}", atol=0, rtol=0):
            return v.report()
        expected = fused.rms_norm_torch(expected_h, w, eps)
        block = _triton.next_power_of_2(hidden)
        hints = {
            "normalised x without the residual: with HAS_RESIDUAL, normalise h = x + residual": _wrong_rms(x, w, eps),
            f"divided the sum of squares by BLOCK ({block}) instead of hidden ({hidden}): the padding is not "
            f"part of the row": _wrong_rms(expected_h, w, eps, block),
            "added eps after the square root instead of inside it": _wrong_rms(expected_h, w, eps, eps_outside=True),
            "forgot to multiply by the weight": _wrong_rms(expected_h, w, eps, weighted=False),
            "subtracted the mean (that is LayerNorm; RMSNorm does not centre the row)": _wrong_rms(
                expected_h, w, eps, centred=True
            ),
            "left out eps (it keeps small rows from blowing up)": _wrong_rms(expected_h, w, 0.0),
        }
        if not with_residual:
            del hints["normalised x without the residual: with HAS_RESIDUAL, normalise h = x + residual"]
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        hints = {k: val.to(dtype) for k, val in hints.items()}
        if y.dtype != dtype:
            v.fail(f"y has dtype {y.dtype} on {what}; store it in the output's dtype (out_ptr.dtype.element_ty).")
            return v.report()
        if not tensor_like(v, y, expected, f"y on {what}", atol=tol, rtol=tol, hints=hints):
            return v.report()
    return v.report("One read of x, the residual and the weight, one write of y and h: the fused RMSNorm.")


__all__ = ["matmul_intensity", "rms_norm_kernel", "unfused_rmsnorm_residual_bytes"]
