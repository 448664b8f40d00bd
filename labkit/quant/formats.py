"""Number formats for weights: integer grids, float-offset grids, NF4/FP4 lookup grids, FP8.

Integer grid (the GPTQ paper's, and AutoGPTQ's storage):
    code q in {0, ..., 2^bits - 1},   ŵ = scale · (q − zero)
    asymmetric: the range [min(w, 0), max(w, 0)] spans the 2^bits levels; zero = round(−min / scale),
                an integer, so 0.0 is exactly on the grid.
    symmetric:  range [−max|w|, max|w|], zero = 2^(bits−1) fixed (scale = 2·max|w| / (2^bits − 1),
                as the GPTQ reference code does; the top code is then 0.5 scale short of max|w|).
Float-offset grid (GGUF's Q4_1, "scale + min"):
    ŵ = scale · q + offset,   offset = min(w) (a float),   scale = (max(w) − min(w)) / (2^bits − 1).
    The grid spans the group's own range exactly; 0.0 is usually not on it. The course model's decoder
    weights were Q4_1 (4 bits, groups of 32), so `quantize(w, 4, 32, float_offset=True)` gives them back
    exactly, while the integer-zero grid of the same size does not (its levels are shifted).

One scale (and zero) per tensor, per output channel (row of W), or per group of `group_size`
consecutive input columns. group_size must divide in_features, so every group is alike and W reshapes
to [out, n_groups, group_size]. (SmolLM2's hidden size 576 is 4.5 × 128, so its CPU profile uses g64;
the GPTQ reference code would accept g128 there, with a short last group.) Scales (and float offsets)
are rounded to fp16 *before* the codes are computed (`scale_dtype`), because that is how they are
stored: what the fake-quantized weights show is then exactly what a packed layer reproduces.

Shapes: w: [out_features, in_features]; codes: the same, uint8; scale, zero: [out, n_groups]
(n_groups = 1 per channel, in / group_size per group; [1, 1] per tensor).
"""

from __future__ import annotations

import numbers

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


# --- checks ---------------------------------------------------------------------------------------


def check_bits(bits) -> None:
    # An integer, not 4.0 or True (4.0 == 4, but bit shifts need an int; True == 1).
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: integer grids here have bits in {SUPPORTED_BITS} (an int).")


def check_weight(w, what: str = "w") -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what} must be a floating-point matrix [out_features, in_features]; got {got}.")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"{what} holds {bad} non-finite (NaN or inf) values: a quantization grid cannot "
            f"represent them. Find where they came from before quantizing."
        )


def check_group_size(group_size, in_features: int | None = None) -> int | None:
    """Normalise group_size: None or -1 (AutoGPTQ's spelling) -> None, one group per row; else a positive int
    that divides in_features (when given), so that every group holds the same number of input columns."""
    if group_size is None or group_size == -1:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size={group_size!r}: use None (or -1) for one scale per output channel, or a "
            f"positive integer number of input columns per group (e.g. 32, 64, 128)."
        )
    if in_features is not None and in_features % group_size:
        some = [g for g in (16, 32, 64, 96, 128, 192, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}: every group must hold "
            f"the same number of input columns. Use None (or -1) for one scale per output channel, "
            f"or a divisor of {in_features}{' such as ' + ', '.join(map(str, some)) if some else ''}."
        )
    return group_size


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else in_features // check_group_size(group_size, in_features)


def group_index(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """g_idx without act-order: the group of each input column, [in] int32 (all 0 per channel)."""
    columns = torch.arange(in_features, dtype=torch.int32, device=device)
    return columns * 0 if group_size is None else columns // group_size


# --- integer and float-offset grids -----------------------------------------------------------------


def find_params(
    x: torch.Tensor,
    bits: int,
    sym: bool = False,
    float_offset: bool = False,
    scale_dtype: torch.dtype | None = torch.float16,
):
    """Grid parameters for each row of x: (scale [rows], zero [rows]), fp32 values.

    x: [rows, cols], the values that share one scale (a row of W, or one group of a row).
    zero is the integer zero point (held in a float tensor), or the float offset when float_offset.
    """
    maxq = 2**bits - 1
    x = x.float()
    xmin, xmax = x.amin(1), x.amax(1)
    if float_offset:
        offset = _round_to(xmin, scale_dtype)
        scale = _round_to((xmax - offset) / maxq, scale_dtype)  # the range as the offset is stored
        return _safe_scale(scale, scale_dtype), offset
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # 0.0 must lie on the grid
    if sym:  # ±max|w| (the reference keeps xmin = 0 for a row with no negative weight, clipping its top half)
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)  # an all-zero row: any scale works, avoid 0/0
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    scale = _safe_scale(_round_to((xmax - xmin) / maxq, scale_dtype), scale_dtype)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _round_to(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).float()


def _safe_scale(scale: torch.Tensor, scale_dtype) -> torch.Tensor:
    if not torch.isfinite(scale).all():
        raise ValueError(
            f"a scale overflows {scale_dtype} (weights larger than ~1e6 in one group?); pass scale_dtype=torch.float32."
        )
    # A constant group (max == min) or one below fp16's resolution: any positive scale represents it.
    return scale.clamp(min=2.0**-24)  # 2^-24: fp16's smallest subnormal, exact in fp16


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, float_offset: bool = False
) -> torch.Tensor:
    """Codes of x on the grid (scale, zero), which broadcast against x. Returns uint8, same shape as x."""
    maxq = 2**bits - 1
    x = x.float()
    q = torch.round((x - zero) / scale) if float_offset else torch.round(x / scale) + zero  # Q4_1's grid, or ints
    return q.clamp(0, maxq).to(torch.uint8)


def round_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, float_offset: bool = False
) -> torch.Tensor:
    """x rounded to the nearest level of the grid (scale, zero), in fp32: dequantize_codes(quantize_codes(...))
    in one step, without the uint8 round trip (GPTQ does this once per column)."""
    maxq = 2**bits - 1
    if float_offset:
        return scale * torch.round((x - zero) / scale).clamp(0, maxq) + zero
    return scale * ((torch.round(x / scale) + zero).clamp(0, maxq) - zero)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, float_offset: bool = False
) -> torch.Tensor:
    """ŵ from codes (broadcasting scale and zero), in fp32. Same operation order as GGUF's (d·q) + m."""
    q = q.float()
    if float_offset:
        return scale * q + zero
    return scale * (q - zero)


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    *,
    per_tensor: bool = False,
    float_offset: bool = False,
    scale_dtype: torch.dtype | None = torch.float16,
):
    """Round-to-nearest quantization of a weight matrix. Returns (codes, scale, zero).

    w: [out, in]. group_size: None (or -1) = one scale per output channel; an int = one per group
    of that many consecutive input columns (it must divide in).
    per_tensor=True: one scale for the whole matrix.
    Returns codes [out, in] uint8 in [0, 2^bits); scale, zero [out, n_groups] fp32 ([1, 1] per
    tensor). With float_offset, `zero` holds the float offset (ŵ = scale·q + offset).
    """
    check_bits(bits)
    check_weight(w)
    out_features, in_features = w.shape
    group_size = check_group_size(group_size, in_features)
    if sym and float_offset:
        raise ValueError(
            "sym=True and float_offset=True contradict each other: a float-offset grid is asymmetric by construction."
        )
    if per_tensor and group_size is not None:
        raise ValueError(f"per_tensor=True with group_size={group_size}: choose one granularity.")
    if per_tensor:
        rows = w.reshape(1, -1)
    elif group_size is None:
        rows = w
    else:
        rows = w.reshape(-1, group_size)  # [out * n_groups, group_size], groups of one row are adjacent
    scale, zero = find_params(rows, bits, sym, float_offset, scale_dtype)
    codes = quantize_codes(rows, scale[:, None], zero[:, None], bits, float_offset)
    n_rows = 1 if per_tensor else out_features
    codes = codes.reshape(out_features, in_features)
    return codes, scale.reshape(n_rows, -1), zero.reshape(n_rows, -1)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
    *,
    g_idx: torch.Tensor | None = None,
    float_offset: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ŵ [out, in] from codes [out, in] and scale, zero [out, n_groups] (or [1, 1]).

    With n_groups > 1, pass group_size (group k covers input columns k·gs .. (k+1)·gs − 1), or
    g_idx [in] (act-order checkpoints): the group of each input column.
    """
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    if g_idx is None and groups > 1:
        group_size = check_group_size(group_size, in_features)
        if group_size is None or n_groups(in_features, group_size) != groups:
            raise ValueError(
                f"scale has {groups} groups per row for in_features={in_features}: pass the "
                f"group_size it was made with (got {group_size}), or g_idx."
            )
        q = codes.reshape(out_features, groups, group_size)  # broadcast over [out, n_groups, group_size]
        w = dequantize_codes(q, scale[..., None], zero[..., None], float_offset)
        return w.reshape(out_features, in_features).to(dtype)
    if g_idx is not None:
        w = dequantize_codes(codes, scale[:, g_idx.long()], zero[:, g_idx.long()], float_offset)
    else:  # one group per row, or per tensor: broadcast [out or 1, 1]
        w = dequantize_codes(codes, scale, zero, float_offset)
    return w.to(dtype)


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = False, **kwargs
) -> torch.Tensor:
    """quantize then dequantize: ŵ in w's dtype and shape."""
    codes, scale, zero = quantize(w, bits, group_size, sym, **kwargs)
    return dequantize(codes, scale, zero, group_size, float_offset=kwargs.get("float_offset", False), dtype=w.dtype)


# --- lookup grids: NF4 (QLoRA) and FP4 ------------------------------------------------------------

# QLoRA's NormalFloat-4 (Dettmers et al. 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero. Blocks of 64 weights share one absmax scale.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
# FP4 E2M1 (the OCP microscaling element type): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, divided by 6 so that
# an absmax scale maps onto [-1, 1]. 15 distinct values (+0 and −0 coincide). bitsandbytes' "fp4"
# uses a slightly different E2M1 table (its subnormal is 1/192 instead of 1/12).
FP4 = torch.tensor([-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]) / 6


def quantize_lut(w: torch.Tensor, grid: torch.Tensor, block_size: int = 64):
    """Absmax-scaled lookup-grid quantization (QLoRA's NF4 with block_size=64).

    w: [out, in]; grid: sorted values in [-1, 1], at most 256. Returns (codes [out, in] uint8: index
    into grid of the nearest value to w / absmax, absmax [out, in / block_size] fp32).
    """
    check_weight(w)
    block_size = check_group_size(block_size) or w.shape[1]
    if w.shape[1] % block_size:
        raise ValueError(f"block_size={block_size} does not divide in_features={w.shape[1]}.")
    grid = grid.float().to(w.device)
    if grid.numel() > 256 or not (grid[1:] > grid[:-1]).all():
        raise ValueError("grid must be strictly increasing with at most 256 values.")
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(1, keepdim=True).clamp(min=1e-12)
    x = blocks / absmax
    # nearest grid value = number of midpoints below x (ties go to the lower value)
    codes = torch.bucketize(x, (grid[1:] + grid[:-1]) / 2)
    return codes.to(torch.uint8).reshape(w.shape), absmax.reshape(w.shape[0], -1)


def dequantize_lut(
    codes: torch.Tensor, absmax: torch.Tensor, grid: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    out_features, in_features = codes.shape
    values = grid.float().to(codes.device)[codes.long()].reshape(out_features, absmax.shape[1], -1)
    return (values * absmax[..., None]).reshape(out_features, in_features).to(dtype)


# --- FP8 ------------------------------------------------------------------------------------------

# name: (exponent bits, mantissa bits, exponent bias, largest finite value, torch dtype name)
FP8_FORMATS = {
    "e4m3": (4, 3, 7, 448.0, "float8_e4m3fn"),  # no infinities; S.1111.111 is NaN
    "e5m2": (5, 2, 15, 57344.0, "float8_e5m2"),  # IEEE-like, with infinities
}


def _fp8_spec(fmt: str):
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt={fmt!r}: FP8 formats are {list(FP8_FORMATS)}.")
    return FP8_FORMATS[fmt]


def fp8_round_reference(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """x rounded to the nearest FP8 value (ties to even), saturating at ±max; plain torch arithmetic."""
    _, mbits, bias, maxval, _ = _fp8_spec(fmt)
    x32 = x.float()
    a = x32.abs().clamp(max=maxval)
    _, e = torch.frexp(a)  # a = m · 2^e with m in [0.5, 1): floor(log2 a) = e − 1
    e = (e - 1).clamp(min=1 - bias)  # below the smallest normal exponent: subnormal spacing
    step = torch.exp2((e - mbits).float())  # spacing of representable values around a
    r = torch.round(a / step) * step  # torch.round rounds half to even
    return (torch.sign(x32) * r).to(x.dtype)


def fp8_round(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """x rounded to FP8 `fmt` (saturating), returned in x's dtype. Uses torch's float8 dtype when it
    exists (a cast rounds to nearest even), else fp8_round_reference."""
    _, _, _, maxval, dtype_name = _fp8_spec(fmt)
    if not torch.isfinite(x).all():
        raise ValueError("x holds non-finite values; FP8 rounding here saturates finite values only.")
    fp8 = getattr(torch, dtype_name, None)
    if fp8 is None:
        return fp8_round_reference(x, fmt)
    # Saturate first: torch's cast turns values beyond the largest finite one into NaN (e4m3) or inf.
    return x.float().clamp(-maxval, maxval).to(fp8).to(x.dtype)


def quantize_fp8(w: torch.Tensor, fmt: str = "e4m3", per_channel: bool = True):
    """Scaled FP8 weights: returns (values [out, in] on the FP8 grid, fp32; scale [out, 1] or [1, 1]).

    ŵ = values · scale, with scale = absmax / (largest FP8 value) so the largest weight maps to it.
    """
    check_weight(w)
    maxval = _fp8_spec(fmt)[3]
    absmax = w.float().abs().amax(1, keepdim=True) if per_channel else w.float().abs().amax().reshape(1, 1)
    scale = (absmax / maxval).clamp(min=1e-12)
    return fp8_round(w.float() / scale, fmt), scale
