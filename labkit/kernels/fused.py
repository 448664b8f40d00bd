"""Fused kernels for a Llama decoder layer, each beside its plain torch reference.

    rms_norm(x, weight, eps, residual=None)      RMSNorm, or fused residual add + RMSNorm
    silu_and_mul(gate_up) / swiglu(gate, up)     SiLU(gate) * up, the SwiGLU MLP's activation
    rotary(x, cos, sin)                          rotary position embedding (Llama's rotate-half)
    w4a16_matmul(x, qweight, scales, zeros, group_size)   4-bit weights, dequantized inside the matmul

Why fuse: these ops do a few flops per byte, so their time is memory traffic. Eager PyTorch runs
each elementwise step as its own kernel that reads its inputs from and writes its result to
device memory; a fused kernel reads the inputs once and writes the outputs once (the counts are
in each function's docstring). Every function takes backend="auto" | "triton" | "torch": Triton on
CUDA tensors, torch otherwise; "triton" on CPU needs TRITON_INTERPRET=1 (Triton's interpreter).
Every kernel computes in fp32 and rounds where the unfused PyTorch code would, so that the two
agree to the last bit or two of the output dtype.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux only: the torch references work without it, and
    tl = None  # a Triton launch says how to install it (_triton.load)
import torch.nn.functional as F

from . import _triton
from ._triton import jit, next_power_of_2


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


# --- RMSNorm (optionally fused with the residual add) -----------------------------------------------


def rms_norm(x, weight, eps: float = 1e-6, residual=None, backend: str = "auto", kernel=None):
    """y = x / sqrt(mean(x²) + eps) · weight, as transformers' LlamaRMSNorm (fp32 statistics).

    x: [..., hidden]; weight: [hidden]; residual: None or [..., hidden] like x.
    Without residual: returns y. With residual: h = x + residual, returns (rms_norm(h), h), the
    decoder layer's "add the sublayer's output to the residual stream, then normalise" in one pass.
    kernel: None (labkit's rms_norm_kernel) or your own @triton.jit kernel of its signature (lesson 10's
    "build it"), launched with one program per row wherever the Triton backend runs (the torch
    backend has no kernel to replace); its outputs start as NaN, so entries it never stores show.
    Traffic (hidden = n elements per row): eager reads/writes about 8n elements per row in 5-6
    kernels (add, pow, mean, rsqrt-mul, cast, mul); fused: reads x, residual, weight, writes y, h.
    """
    where = "rms_norm"
    _triton.check_float(where, x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{where}: weight must be [hidden={x.shape[-1]}]; got {tuple(weight.shape)}.")
    tensors = dict(x=x, weight=weight)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"{where}: residual must match x ({tuple(x.shape)} {x.dtype}); got "
                f"{tuple(residual.shape)} {residual.dtype}."
            )
        tensors["residual"] = residual
    _triton.check_contiguous(where, **tensors)
    check_kernel(kernel, "kernel")
    if _triton.resolve_backend(backend, where, *tensors.values()) == "torch":
        return rms_norm_torch(x, weight, eps, residual)
    return _rms_norm_triton(x, weight, eps, residual, kernel)


def check_kernel(kernel, name: str) -> None:
    """None or a Triton kernel (something launched as kernel[grid](...)); else ValueError naming `name`."""
    if kernel is not None and not (callable(getattr(kernel, "__getitem__", None)) and hasattr(kernel, "fn")):
        raise ValueError(
            f"{name}={kernel!r}: pass a Triton kernel, a function decorated with @triton.jit (launched as "
            f"kernel[grid](...)), or None for labkit's own."
        )


def rms_norm_torch(x, weight, eps: float = 1e-6, residual=None):
    """Reference, transformers' LlamaRMSNorm line by line (x: [..., hidden], weight: [hidden])."""
    if residual is not None:
        h = x + residual  # in x's dtype, as the decoder layer adds it
        return rms_norm_torch(h, weight, eps), h
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


@jit
def rms_norm_kernel(
    out_ptr,  # [rows, hidden]
    x_ptr,  # [rows, hidden]
    residual_ptr,  # [rows, hidden] (read only if HAS_RESIDUAL)
    residual_out_ptr,  # [rows, hidden] x + residual (written only if HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # hidden padded to a power of 2: one row per program, in registers
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(residual_out_ptr.dtype.element_ty)  # rounded as the unfused add would be
        tl.store(residual_out_ptr + row * hidden + offs, h, mask=mask)
        x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / hidden
    normed = (x / tl.sqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_meta(hidden: int, has_residual: bool) -> dict:
    """Compile-time constants (labkit.kernels.offline compiles the same): the whole row in one block."""
    return dict(HAS_RESIDUAL=has_residual, BLOCK=max(16, next_power_of_2(hidden)))


def _rms_norm_triton(x, weight, eps, residual, kernel=None):
    empty = torch.empty_like if kernel is None else functools.partial(torch.full_like, fill_value=float("nan"))
    out = empty(x)
    h = empty(x) if residual is not None else None
    rows, hidden = _rows(x), x.shape[-1]
    if rows:
        (kernel or rms_norm_kernel)[(rows,)](
            out,
            x,
            residual if residual is not None else x,
            h if h is not None else out,
            weight,
            hidden,
            float(eps),
            **_rms_norm_meta(hidden, residual is not None),
        )
    return (out, h) if residual is not None else out


# --- SiLU(gate) * up ---------------------------------------------------------------------------------


def silu_and_mul(gate_up, backend: str = "auto"):
    """SiLU(gate) · up for gate_up: [..., 2·d] = cat(gate, up) (vLLM's merged gate_up_proj layout).
    Returns [..., d]. Traffic: eager reads 2d, writes d (silu), reads 2d, writes d (mul); fused
    reads 2d and writes d elements per row."""
    where = "silu_and_mul"
    _triton.check_float(where, gate_up=gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(
            f"{where}: the last dimension of gate_up must be even (gate then up); got {gate_up.shape[-1]}."
        )
    _triton.check_contiguous(where, gate_up=gate_up)
    d = gate_up.shape[-1] // 2
    if _triton.resolve_backend(backend, where, gate_up) == "torch":
        return swiglu_torch(gate_up[..., :d], gate_up[..., d:])
    out = gate_up.new_empty(*gate_up.shape[:-1], d)
    _swiglu_launch(out, gate_up, gate_up, d, d, 2 * d)
    return out


def swiglu(gate, up, backend: str = "auto"):
    """SiLU(gate) · up, as in LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)).
    gate, up: [..., d]; returns [..., d]."""
    where = "swiglu"
    _triton.check_float(where, gate=gate, up=up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"{where}: gate and up must have the same shape and dtype; got {tuple(gate.shape)} "
            f"{gate.dtype} and {tuple(up.shape)} {up.dtype}."
        )
    _triton.check_contiguous(where, gate=gate, up=up)
    if _triton.resolve_backend(backend, where, gate, up) == "torch":
        return swiglu_torch(gate, up)
    out = torch.empty_like(gate)
    _swiglu_launch(out, gate, up, 0, gate.shape[-1], gate.shape[-1])
    return out


def swiglu_torch(gate, up):
    """Reference: F.silu(gate) * up (gate, up: [..., d]), each op rounding to the input dtype."""
    return F.silu(gate) * up


@jit
def _swiglu_kernel(
    out_ptr,  # [rows, d]
    gate_ptr,  # [rows, row_stride]: gate at columns [0, d)
    up_ptr,  # [rows, row_stride]: up at columns [up_offset, up_offset + d)
    up_offset,
    d,
    row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    g = tl.load(gate_ptr + row * row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * row_stride + up_offset + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
    tl.store(out_ptr + row * d + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def _swiglu_launch(out, gate, up, up_offset, d, row_stride):
    # gate_up case: gate and up are the same tensor, up starts `up_offset = d` elements into each row.
    rows = _rows(out)
    if rows and d:
        meta = _swiglu_meta(d)
        grid = (rows, _cdiv(d, meta["BLOCK"]))
        _swiglu_kernel[grid](out, gate, up, up_offset, d, row_stride, **meta)


def _swiglu_meta(d: int) -> dict:
    """Compile-time constants (labkit.kernels.offline compiles the same): up to 1024 columns per program."""
    return dict(BLOCK=min(1024, max(16, next_power_of_2(d))))


# --- rotary position embedding -----------------------------------------------------------------------


def rotary(x, cos, sin, backend: str = "auto"):
    """x · cos + rotate_half(x) · sin, with rotate_half(x) = cat(-x2, x1) (transformers'
    apply_rotary_pos_emb, Llama convention: the two halves of head_dim are the pairs).

    x: [batch, num_heads, seq_len, head_dim] (q or k, as the attention module holds them)
    cos, sin: [batch, seq_len, head_dim] (what model.model.rotary_emb returns) or [seq_len, head_dim]
    Returns x's shape and dtype. Traffic: eager makes ~6 passes (2 muls, neg, cat, add, ...); fused
    reads x once (plus cos/sin, shared by all heads) and writes once.
    """
    where = "rotary"
    _triton.check_float(where, x=x, cos=cos, sin=sin)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(
            f"{where}: x must be [batch, num_heads, seq_len, head_dim] with an even head_dim; got {tuple(x.shape)}."
        )
    batch, _, seq_len, head_dim = x.shape
    if cos.shape != sin.shape or cos.shape not in ((batch, seq_len, head_dim), (seq_len, head_dim)):
        raise ValueError(
            f"{where}: cos and sin must be [batch={batch}, seq_len={seq_len}, head_dim={head_dim}] "
            f"or [seq_len, head_dim]; got {tuple(cos.shape)} and {tuple(sin.shape)}."
        )
    _triton.check_contiguous(where, x=x, cos=cos, sin=sin)
    if _triton.resolve_backend(backend, where, x, cos, sin) == "torch":
        return rotary_torch(x, cos, sin)
    out = torch.empty_like(x)
    rows = x.numel() // head_dim
    if rows:
        meta = _rotary_meta(head_dim)
        _rotary_kernel[(_cdiv(rows, meta["BLOCK_R"]),)](
            out,
            x,
            cos,
            sin,
            rows,
            x.shape[1],
            seq_len,
            head_dim // 2,
            cos.shape[-2] * head_dim if cos.dim() == 3 else 0,  # batch stride of cos/sin (0: shared)
            **meta,
        )
    return out


def _rotary_meta(head_dim: int) -> dict:
    """Compile-time constants (labkit.kernels.offline compiles the same): half a head per block column,
    and enough rows per program for ~1024 elements of each half. One row per program (64 values of a
    LLaMA head) ran at 17% of the H200's bandwidth: too little work per program to hide the loads."""
    block = max(16, next_power_of_2(head_dim // 2))
    return dict(BLOCK_R=max(1, 1024 // block), BLOCK=block)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_torch(x, cos, sin):
    """Reference: transformers' apply_rotary_pos_emb for one tensor (x: [batch, heads, seq, head_dim])."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [batch, 1, seq_len, head_dim]: shared by all heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


@jit
def _rotary_kernel(
    out_ptr,  # [batch, num_heads, seq_len, head_dim]
    x_ptr,  # [batch, num_heads, seq_len, head_dim]
    cos_ptr,  # [batch, seq_len, head_dim] or [seq_len, head_dim]
    sin_ptr,  # like cos
    rows,  # batch · num_heads · seq_len
    num_heads,
    seq_len,
    half,  # head_dim // 2
    cos_batch_stride,  # seq_len · head_dim, or 0 when cos/sin are shared by the batch
    BLOCK_R: tl.constexpr,  # (batch, head, position) rows per program
    BLOCK: tl.constexpr,  # half padded to a power of 2
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows of head_dim values
    b = row // (num_heads * seq_len)
    s = row % seq_len
    offs = tl.arange(0, BLOCK)
    mask = (row < rows)[:, None] & (offs < half)[None, :]  # [BLOCK_R, BLOCK]
    first = (row * 2 * half)[:, None] + offs[None, :]  # the first half of each row; the second is `half` on
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + half, mask=mask, other=0.0).to(tl.float32)
    c_first = (b * cos_batch_stride + s * 2 * half)[:, None] + offs[None, :]
    c1 = tl.load(cos_ptr + c_first, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_first + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_first, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_first + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + first, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first + half, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=mask)


# --- W4A16: 4-bit weights, 16-bit activations ------------------------------------------------------------
#
# Layout (labkit's, kept deliberately plain):
#   qweight  uint8 [out_features, in_features // 2]   byte j of row n holds W's codes for input columns
#            2j (low nibble) and 2j + 1 (high nibble): the row-major codes [out, in] packed two per
#            byte, lowest first -- the same bytes as labkit.quant.pack.pack(codes, 4) of an [out, in]
#            code matrix, viewed as [out, in // 2].
#   scales   float [out_features, n_groups]            n_groups = in_features // group_size
#   zeros    float [out_features, n_groups]            a float zero point (an integer one, or a GGUF-
#                                                      style offset: zero = -min / scale)
#   W[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
# group_size must be even (both nibbles of a byte share a group) and divide in_features.


def w4a16_from_codes(codes, scales, zeros, group_size: int):
    """Pack 4-bit codes into this module's layout: returns (qweight, scales, zeros).

    codes: [out_features, in_features] integers in 0..15 (uint8 or any int dtype)
    scales, zeros: [out_features, n_groups] (zeros integer or float; returned as scales' dtype)
    """
    if codes.dim() != 2 or codes.is_floating_point():
        raise ValueError(
            f"w4a16_from_codes: codes must be a 2-D integer tensor [out, in]; got {tuple(codes.shape)} {codes.dtype}."
        )
    if codes.numel() and (codes.min().item() < 0 or codes.max().item() > 15):
        raise ValueError(
            f"w4a16_from_codes: codes must lie in 0..15; got [{codes.min().item()}, {codes.max().item()}]."
        )
    in_features = codes.shape[1]
    if in_features % 2:
        raise ValueError(f"w4a16_from_codes: in_features={in_features} must be even (two codes per byte).")
    c = codes.to(torch.uint8)
    qweight = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()  # [out, in // 2]: low nibble = even column
    scales = scales.contiguous()
    zeros = zeros.to(scales.dtype).contiguous()
    _check_w4a16_weights("w4a16_from_codes", qweight, scales, zeros, group_size)
    return qweight, scales, zeros


def w4a16_unpack(qweight):
    """qweight uint8 [out, in // 2] -> codes uint8 [out, in] (the inverse of the packing above)."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def w4a16_dequantize(qweight, scales, zeros, group_size: int, dtype=torch.float32):
    """W [out, in] = (code - zero) · scale, computed in fp32, returned in `dtype`."""
    codes = w4a16_unpack(qweight).float()  # [out, in]
    s = scales.float().repeat_interleave(group_size, dim=1)  # [out, in]
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((codes - z) * s).to(dtype)


def _check_w4a16_weights(where, qweight, scales, zeros, group_size):
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(
            f"{where}: qweight must be uint8 [out_features, in_features // 2]; got "
            f"{tuple(qweight.shape)} {qweight.dtype}. Pack codes with w4a16_from_codes."
        )
    out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(f"{where}: group_size={group_size} must be even and divide in_features={in_features}.")
    n_groups = in_features // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (out_features, n_groups):
            raise ValueError(
                f"{where}: {name} must be [out_features={out_features}, n_groups={n_groups}]; got {tuple(t.shape)}."
            )
    _triton.check_float(where, scales=scales, zeros=zeros)


def w4a16_matmul(x, qweight, scales, zeros, group_size: int, backend: str = "auto"):
    """y = x · Wᵀ with W stored as 4-bit codes (layout above), dequantized tile by tile in registers.

    x: [..., in_features] fp16/bf16/fp32; qweight: uint8 [out_features, in_features // 2];
    scales, zeros: [out_features, n_groups]. Returns [..., out_features] in x's dtype (fp32 accumulate).
    Traffic at decode (few rows of x): the weight dominates; 0.5 byte per weight plus 2·2 bytes per
    group (scale, zero) instead of 2 bytes (fp16): ~3.9x fewer bytes at group size 128. The torch
    reference instead writes the dequantized fp16 W to memory and reads it back for the matmul.
    """
    where = "w4a16_matmul"
    _check_w4a16_weights(where, qweight, scales, zeros, group_size)
    _triton.check_float(where, x=x)
    if x.shape[-1] != 2 * qweight.shape[1]:
        raise ValueError(f"{where}: x has {x.shape[-1]} input features, the weight {2 * qweight.shape[1]}.")
    _triton.check_contiguous(where, x=x, qweight=qweight, scales=scales, zeros=zeros)
    if _triton.resolve_backend(backend, where, x, qweight, scales, zeros) == "torch":
        return w4a16_matmul_torch(x, qweight, scales, zeros, group_size)
    return _w4a16_matmul_triton(x, qweight, scales, zeros, group_size)


def w4a16_matmul_torch(x, qweight, scales, zeros, group_size: int):
    """Reference: dequantize the whole W to x's dtype, then a dense matmul (x: [..., in])."""
    return F.linear(x, w4a16_dequantize(qweight, scales, zeros, group_size, dtype=x.dtype))


@jit
def _w4a16_matmul_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K]
    qweight_ptr,  # [N, K // 2] uint8, two codes per byte (low nibble = even column)
    scales_ptr,  # [N, n_groups]
    zeros_ptr,  # [N, n_groups]
    M,
    N,
    K,
    n_groups,
    group_size,
    split_cols,  # input columns per program along K (a multiple of the K step and, with STEP_IN_GROUP, of groups)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # packed bytes per K step (= 2 · BLOCK_KB input columns), >= 16
    STEP_IN_GROUP: tl.constexpr,  # every K step lies inside one group (group_size % (2 · BLOCK_KB) == 0)
    FP32_MATH: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Each program computes a [BLOCK_M, BLOCK_N] tile of y. Per K step it reads a [BLOCK_KB, BLOCK_N]
    # tile of packed bytes once and splits it into the even-column and odd-column weights, so
    #     y = x[:, 0::2] · W[:, 0::2]ᵀ + x[:, 1::2] · W[:, 1::2]ᵀ
    # needs no interleaving; both halves share the byte's group scale and zero.
    # Split-K (program_id(2)): each program sums its own `split_cols` input columns into its own slice
    # out[pid_k] of an fp32 [SPLIT_K, M, N] buffer, and the launcher adds the slices (in a fixed order:
    # deterministic, unlike atomics). At decode there are few output tiles (64 for N = 4096), too few
    # programs to keep a large GPU's memory system busy; splitting K multiplies them.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    KB = K // 2
    kb_start = pid_k * (split_cols // 2)
    kb_end = tl.minimum(KB, kb_start + split_cols // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_KB):
        b = kb0 + tl.arange(0, BLOCK_KB)  # [BLOCK_KB] byte columns: input columns 2b and 2b + 1
        b_mask = b < kb_end
        w_mask = b_mask[:, None] & n_mask[None, :]
        packed = tl.load(qweight_ptr + offs_n[None, :] * KB + b[:, None], mask=w_mask, other=0).to(tl.int32)
        if STEP_IN_GROUP:  # one scale and one zero per output column for the whole step: [1, BLOCK_N]
            sz_offs = offs_n * n_groups + (2 * kb0) // group_size  # [BLOCK_N]
            scale = tl.load(scales_ptr + sz_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            zero = tl.load(zeros_ptr + sz_offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:  # groups narrower than a step, or not aligned with it: each byte's own group
            group = (2 * b) // group_size  # [BLOCK_KB]
            sz_offs = offs_n[None, :] * n_groups + group[:, None]  # [BLOCK_KB, BLOCK_N]
            scale = tl.load(scales_ptr + sz_offs, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + sz_offs, mask=w_mask, other=0.0).to(tl.float32)
        w_even = ((packed & 0xF).to(tl.float32) - zero) * scale  # [BLOCK_KB, BLOCK_N] = W[n, 2b]ᵀ
        w_odd = (((packed >> 4) & 0xF).to(tl.float32) - zero) * scale  # W[n, 2b + 1]ᵀ
        x_offs = offs_m[:, None] * K + 2 * b[None, :]  # [BLOCK_M, BLOCK_KB]
        x_mask = m_mask[:, None] & b_mask[None, :]
        x_even = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + x_offs + 1, mask=x_mask, other=0.0)
        if FP32_MATH:
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        acc += tl.dot(x_even, w_even.to(x_even.dtype), input_precision=PRECISION)
        acc += tl.dot(x_odd, w_odd.to(x_odd.dtype), input_precision=PRECISION)
    out_offs = pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _w4a16_split_k(M: int, K: int) -> int:
    """Programs along K: at decode (M <= 16) one per 512 input columns, at most 8 (4096 -> 8); else 1.
    On the H200 the unsplit decode kernel (64 programs for a 4096 x 4096 layer) read its 4-bit weights
    more slowly than cuBLAS read the fp16 ones (benchmarks/gpu_check.sh, 2026-12-04)."""
    return min(8, max(1, K // 512)) if M <= 16 else 1


def _w4a16_meta(M: int, group_size: int, dtype: torch.dtype) -> dict:
    """The kernel's compile-time constants and warps for M rows of x (labkit.kernels.offline compiles
    the same). BLOCK_M: 16 at decode (tl.dot's smallest tile), else 64 (32 in fp32); a 64-row tile
    gets 8 warps (with 4 it spills registers on sm75 and sm80). The K step is 64 input columns, or 32
    when that makes it fit inside a group (group size 32), so that scale and zero are loaded once
    per step, not once per weight; other group sizes fall back to a load per byte, with 8 warps (with 4
    the decode tile spilled registers on sm89 under Triton 3.6)."""
    block_m = 16 if M <= 16 else 64 if dtype.itemsize <= 2 else 32
    block_kb = 32 if group_size % 64 == 0 else 16 if group_size % 32 == 0 else 32
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_KB=block_kb,
        STEP_IN_GROUP=group_size % (2 * block_kb) == 0,
        FP32_MATH=_triton.compute_in_fp32(dtype),
        PRECISION=_triton.dot_precision(dtype),
        num_warps=8 if block_m == 64 or group_size % (2 * block_kb) else 4,
    )


def _w4a16_matmul_triton(x, qweight, scales, zeros, group_size):
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    x2 = x.reshape(-1, K)  # [M, K] (a view: x is contiguous)
    M = x2.shape[0]
    out = x.new_empty(*x.shape[:-1], N)
    if M and N:
        meta = _w4a16_meta(M, group_size, x.dtype)
        # K split into whole steps (whole groups when a step lies inside one): `split` programs along K
        unit = group_size if meta["STEP_IN_GROUP"] else 2 * meta["BLOCK_KB"]
        split_cols = _cdiv(_cdiv(K, unit), _w4a16_split_k(M, K)) * unit
        split = _cdiv(K, split_cols)
        dest = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        grid = (_cdiv(M, meta["BLOCK_M"]), _cdiv(N, meta["BLOCK_N"]), split)
        _w4a16_matmul_kernel[grid](
            dest, x2, qweight, scales, zeros, M, N, K, K // group_size, group_size, split_cols, **meta
        )
        if split > 1:
            out.copy_(dest.sum(0).view(out.shape))  # the slices added in order, then cast to x's dtype
    return out
