"""Checks for lesson 04 (number formats and round-to-nearest): the RTN grid of a weight matrix with
groups (the lesson's "build it": quant.rtn runs it on the whole model), an asymmetric integer grid,
packing two 4-bit codes per byte, and the bytes a packed layer stores.

    check.lesson04.rtn_quantize(my_rtn_quantize)
    check.lesson04.quantize_asym(my_quantize_asym)
    check.lesson04.pack_int4(my_pack_int4)
    check.lesson04.quantlinear_bytes(my_quantlinear_bytes)
"""

from __future__ import annotations

import math

import torch

from ..quant import formats
from ..quant import pack as packing
from ..quant.qlinear import QuantLinear
from . import Verdict, as_number, call, exercise, number_like, tensor_like

# Hand-made inputs: both signs, a zero, values that floor and round send to different codes.
_VECTORS = [
    (torch.tensor([-0.9, -0.31, 0.0, 0.12, 0.55, 1.3, 0.77, -0.05]), 4),
    (torch.tensor([0.25, -1.7, 2.9, -0.4, 1.05, -0.02, 0.6]), 3),
    (torch.randn(64, generator=torch.Generator().manual_seed(4)), 4),
]


def _grid(w: torch.Tensor, bits: int, group_size: int | None, *, fp16=True, with_zero=True, steps=None, floor=False):
    """labkit's asymmetric RTN grid of w [out, in] -> (codes [out, in] int64, scale, zero [out, n_groups]),
    and the usual slips (the keyword switches): fp32 scales, a range that leaves 0.0 out, 2^bits steps,
    truncated codes."""
    maxq = 2**bits - 1
    out_f, in_f = w.shape
    rows = w.float().reshape(-1, group_size or in_f)  # [out * n_groups, group]
    lo, hi = rows.amin(1), rows.amax(1)
    if with_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / (steps or maxq)
    scale = (scale.half().float() if fp16 else scale).clamp(min=2.0**-24)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    rounded = torch.floor(rows / scale[:, None]) if floor else torch.round(rows / scale[:, None])
    codes = (rounded + zero[:, None]).clamp(0, maxq)
    return codes.reshape(out_f, in_f).long(), scale.reshape(out_f, -1), zero.reshape(out_f, -1)


@exercise
def rtn_quantize(fn) -> bool:
    """fn(w [out, in], bits, group_size) -> (codes [out, in] integers in [0, 2^bits), scale [out, n_groups],
    zero [out, n_groups]): asymmetric round-to-nearest with one grid per group of `group_size` consecutive
    inputs of a row (None: one per row). The range [min(w, 0), max(w, 0)] covers 0.0; scale = range /
    (2^bits − 1), stored in fp16 (round it: .half().float()); zero = round(−min / scale), clamped to the
    codes' range; codes = clamp(round(w / scale) + zero)."""
    v = Verdict("rtn_quantize")
    g = torch.Generator().manual_seed(5)
    for out_f, in_f, bits, gs in [(4, 16, 4, 8), (3, 12, 3, None), (6, 32, 4, 16)]:
        w = torch.randn(out_f, in_f, generator=g)
        w[0, : gs or in_f] = w[0, : gs or in_f].abs() + 0.1  # a group with no negative weight: 0.0 must be on its grid
        expected_codes, scale, zero = formats.quantize(w, bits, gs)
        out = call(v, fn, w.clone(), bits, gs)
        if v.problem:
            break
        if not isinstance(out, tuple) or len(out) != 3:
            v.fail(f"return a triple (codes, scale, zero); got {type(out).__name__}.")
            break
        codes, got_scale, got_zero = out
        what = f"W {out_f}x{in_f}, {bits} bits, group_size={gs}"
        whole = isinstance(codes, torch.Tensor) and torch.isfinite(codes.float()).all()
        if whole and codes.is_floating_point() and not torch.equal(codes, codes.round()):
            v.fail(f"the codes of {what} are not whole numbers: round w / scale to the nearest integer.")
            break
        if whole:
            codes = codes.long()
        slips = {
            "kept the scale in fp32: labkit stores scales in fp16, so round it (scale.half().float()) before "
            "computing the zero point and the codes": _grid(w, bits, gs, fp16=False),
            "left 0.0 out of the range: use min(w, 0) and max(w, 0), so that a zero weight stays exactly zero": _grid(
                w, bits, gs, with_zero=False
            ),
            f"divided the range by 2^bits = {2**bits}: {bits} bits have 2^bits − 1 = {2**bits - 1} steps": _grid(
                w, bits, gs, steps=2**bits
            ),
            "used floor (truncation) instead of rounding to the nearest code": _grid(w, bits, gs, floor=True),
        }
        if gs is not None:
            slips["used one grid per row: with group_size, each group of consecutive inputs has its own"] = _grid(
                w, bits, None
            )
        hints = {words: c for words, (c, _, _) in slips.items()}
        if not tensor_like(v, codes, expected_codes.long(), f"the codes of {what}", atol=0, rtol=0, hints=hints):
            break
        scale_hints = {words: s for words, (_, s, _) in slips.items() if words.startswith("kept")}
        if not tensor_like(v, got_scale, scale, f"the scale of {what}", atol=0, rtol=1e-6, hints=scale_hints):
            break
        if not tensor_like(v, got_zero, zero, f"the zero point of {what}", atol=0, rtol=0):
            break
    return v.report("The codes, fp16 scales and zero points of labkit.quant.quantize, group by group.")


@exercise
def quantize_asym(fn) -> bool:
    """fn(x [n] float, bits) -> (codes [n] integers in [0, 2^bits), x_hat [n] float): asymmetric RTN
    with an integer zero point, one scale for the whole vector (kept in fp32, not rounded to fp16)."""
    v = Verdict("quantize_asym")
    for x, bits in _VECTORS:
        out = call(v, fn, x.clone(), bits)
        if v.problem:
            break
        if not isinstance(out, tuple) or len(out) != 2:
            v.fail(f"return a pair (codes, x_hat); got {type(out).__name__}.")
            break
        codes, x_hat = out
        q, scale, zero = formats.quantize(x[None], bits, scale_dtype=None)  # labkit's grid, fp32 scale
        expected_codes, expected = q[0].long(), formats.dequantize(q, scale, zero)[0]
        maxq = 2**bits - 1
        if isinstance(codes, torch.Tensor) and codes.is_floating_point():
            if not torch.isfinite(codes).all():
                v.fail(f"codes hold NaN or inf for bits={bits}: every code is an integer in [0, {maxq}].")
                break
            if not torch.equal(codes, codes.round()):
                v.fail("codes are not whole numbers: round x / scale to the nearest integer.")
                break
            codes = codes.long()
        if isinstance(codes, torch.Tensor) and not codes.is_floating_point():
            codes = codes.long()
        s = (x.max().clamp(min=0) - x.min().clamp(max=0)) / maxq
        z = torch.round(-x.min().clamp(max=0) / s)
        hints = {
            "used floor (truncation) instead of rounding to the nearest code": (torch.floor(x / s) + z)
            .clamp(0, maxq)
            .long(),
            (
                "forgot the zero point (codes must be shifted by zero = round(-min / scale) so that they are >= 0)"
            ): torch.round(x / s).long(),
        }
        if not tensor_like(v, codes, expected_codes, f"codes for bits={bits}", atol=0, rtol=0, hints=hints):
            break
        hints = {
            "forgot to subtract the zero point when dequantizing (x_hat = scale * (code - zero))": s
            * expected_codes.float()
        }
        if not tensor_like(v, x_hat, expected, f"x_hat for bits={bits}", atol=1e-6, rtol=1e-5, hints=hints):
            break
    return v.report("Codes and dequantized values match labkit.quant.quantize / dequantize.")


@exercise
def pack_int4(fn) -> bool:
    """fn(codes [n] uint8 in [0, 16)) -> uint8 [ceil(n / 2)]: code 2j in the low nibble of byte j,
    code 2j+1 in its high nibble; for odd n the last byte's high nibble is 0."""
    v = Verdict("pack_int4")
    g = torch.Generator().manual_seed(0)
    for n in (2, 8, 7, 33):
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        codes[0], codes[1] = 3, 12  # a pair whose nibbles cannot be confused
        got = call(v, fn, codes.clone())
        if v.problem:
            break
        expected = packing.pack(codes, 4)
        if isinstance(got, torch.Tensor) and n % 2 and got.shape == (n // 2,):
            v.fail(
                f"for n={n} codes you returned {n // 2} bytes: the odd last code needs a byte of its own "
                f"(pad with a zero code); expected {math.ceil(n / 2)} bytes."
            )
            break
        even = codes[: n - n % 2].long()
        lo, hi = even[0::2], even[1::2]
        wrong = {
            "put the first code of each pair in the high nibble (labkit's order is low nibble first)": torch.cat(
                [lo * 16 + hi, codes[n - 1 :].long() * 16 if n % 2 else lo[:0]]
            ),
            "added the two codes without shifting the second one by 4 bits": torch.cat(
                [lo + hi, codes[n - 1 :].long() if n % 2 else lo[:0]]
            ),
        }
        if not tensor_like(v, got, expected, f"packed bytes for n={n}", atol=0, rtol=0, hints=wrong):
            break
        if got.dtype != torch.uint8:
            v.fail(
                f"the values are right but the dtype is {got.dtype}: return torch.uint8, one byte per pair "
                f"(with {got.dtype} each pair takes {got.element_size()} bytes and nothing is saved)."
            )
            break
    return v.report("Two codes per byte, low nibble first: the layout of labkit.quant.pack.pack(codes, 4).")


@exercise
def quantlinear_bytes(fn) -> bool:
    """fn(out_features, in_features, bits, group_size) -> int: bytes a labkit QuantLinear stores (asymmetric
    integer grid, no bias): packed codes + fp16 scales + packed integer zero points, one scale and zero per
    group of `group_size` input columns (None: one per output row; group_size divides in_features)."""
    v = Verdict("quantlinear_bytes")
    for out_f, in_f, bits, gs in [(1536, 576, 4, 64), (576, 1536, 3, 64), (576, 1536, 3, 128), (576, 576, 8, None)]:
        got = call(v, fn, out_f, in_f, bits, gs)
        if v.problem:
            break
        expected = QuantLinear(in_f, out_f, bits, gs).stored_bytes()
        groups = 1 if gs is None else in_f // gs
        codes = math.ceil(out_f * in_f * bits / 8)
        zeros = math.ceil(out_f * groups * bits / 8)
        wrong = {
            "stored the scales in fp32 (4 bytes); labkit stores them in fp16 (2 bytes)": codes
            + out_f * groups * 4
            + zeros,
            "forgot the zero points (one `bits`-bit integer per group, packed like the codes)": codes
            + out_f * groups * 2,
            "counted the codes in bits, not bytes (divide out * in * bits by 8)": out_f * in_f * bits
            + out_f * groups * 2
            + zeros,
        }
        value = as_number(got)
        if value is not None and value != expected:
            for description, w in wrong.items():
                if value == w:
                    v.fail(f"for a {out_f}x{in_f} layer at {bits} bits, group_size={gs}: you {description}.")
                    break
        if not number_like(
            v, got, expected, f"bytes of a {out_f}x{in_f} layer at {bits} bits, group_size={gs}", rtol=0
        ):
            break
    return v.report("Matches QuantLinear.stored_bytes(), which labkit.evaluate.weight_bytes counts.")
