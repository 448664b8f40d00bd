"""FlashAttention for prefill: causal attention over a whole prompt without ever storing the
[seq, seq] score matrix (Dao et al. 2022, FlashAttention; the online softmax of Milakov and
Gimelshein 2018, "Online normalizer calculation for softmax").

    from labkit.kernels.flash_attention import flash_attention, flash_attention_torch
    from labkit.kernels.flash_attention import attention_traffic, flash_attention_tiled_torch
    out = flash_attention(q, k, v)                         # causal, scale 1/sqrt(head_dim); causal=False too
    flash_attention_torch(q, k, v)                         # the plain reference
    flash_attention_tiled_torch(q, k, v, block_m=4, block_n=4)   # the kernel's loop, step by step, in torch
    attention_traffic(1, 32, 32, 2048, 128, 2, block_m=64)       # bytes: naive vs tiled, LLaMA-7B shapes

Layouts (transformers' Llama attention after RoPE; shapes are the documentation):
    q    [batch, num_heads, seq, head_dim]
    k, v [batch, num_kv_heads, seq, head_dim]
    out  [batch, num_heads, seq, head_dim]
Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads), as
transformers' repeat_kv does, without copying K and V.

The algorithm (FlashAttention, Algorithm 1): one program per tile of BLOCK_M queries of one head.
It walks the keys in tiles of BLOCK_N and keeps, per query row, the running max m of the scores
seen so far, the running sum l of exp(score - m), and the running output acc = Σ exp(score - m) · v.
A new tile with a larger max rescales l and acc by exp(m_old - m_new) before adding its own terms,
so after the last tile out = acc / l is exactly softmax(q·Kᵀ·scale)·V, computed in one pass.
Causal: query i sees keys 0..i, so the key tiles entirely above the diagonal (every key after the
tile's last query) are skipped, about half of them.

Memory traffic (`attention_traffic`; bytes to and from device memory). The plain version (the
paper's Algorithm 0: S = Q·Kᵀ, P = softmax(S), O = P·V, three kernels) writes S, reads it back,
writes P and reads it back: 4 · seq² elements per head, against 4 · seq · head_dim for Q, K, V and
O. The tiled kernel reads Q once and writes O once, keeps S and P in registers, and reads K and V
once per query tile (up to the diagonal when causal). LLaMA-7B (32 heads of 128, seq 2048, fp16,
batch 1, causal; BLOCK_M = 64, the fp16 tile):
    minimum (Q, K, V read once, O written once)       64 MiB
    naive   (minimum + S and P written and read)    1088 MiB   (S and P: 1024 MiB)
    tiled   (Q, O; K, V per query tile, 32 tiles)     560 MiB   (528 MiB of them K and V, up to the diagonal)
The re-reads are counted as if each came from device memory; but the programs of one head run side
by side (they are the grid's first axis) and share that head's K and V (1 MiB), which the GPU's L2
cache holds (4 MB on the T4, 40 MB and more on the A100 and H100), so the kernel's real traffic
approaches the minimum, while the naive version's 256 MiB of S (and of P) cannot stay in any cache.
At the H200's 4.8 TB/s the naive traffic takes 0.24 ms and the minimum 0.014 ms; the 34 GFLOP of
the causal half of the two matmuls take 0.035 ms at its 989 dense fp16 TFLOP/s: the naive version
is memory-bound, the tiled one compute-bound.
"""

from __future__ import annotations

import math

import torch

try:
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux only: the torch references work without it, and
    tl = None  # a Triton launch says how to install it (_triton.load)

from . import _triton
from ._triton import jit
from .paged_attention import online_softmax_step

WHERE = "flash_attention"


def _check_inputs(q, k, v, causal, scale):
    """Shapes, dtypes, devices and contiguity, with errors that name the argument."""
    for name, t in dict(q=q, k=k, v=v).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{WHERE}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if q.dim() != 4:
        raise ValueError(f"{WHERE}: q must be [batch, num_heads, seq, head_dim]; got shape {tuple(q.shape)}.")
    if k.dim() != 4:
        raise ValueError(f"{WHERE}: k must be [batch, num_kv_heads, seq, head_dim]; got shape {tuple(k.shape)}.")
    if v.shape != k.shape:
        raise ValueError(f"{WHERE}: v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}.")
    batch, num_heads, seq, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{WHERE}: k has batch {k.shape[0]}, q has {batch}.")
    if k.shape[2] != seq:
        raise ValueError(
            f"{WHERE}: k has seq {k.shape[2]}, q has {seq} (prefill: each query attends to the keys of its own prompt)."
        )
    if k.shape[3] != head_dim:
        raise ValueError(f"{WHERE}: head_dim mismatch: q has {head_dim}, k has {k.shape[3]}.")
    if head_dim == 0:
        raise ValueError(f"{WHERE}: q has head_dim 0.")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{WHERE}: num_heads={num_heads} (q) is not a multiple of num_kv_heads={num_kv_heads} (k) "
            f"(grouped-query attention shares each KV head among a whole number of query heads)."
        )
    _triton.check_float(WHERE, q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{WHERE}: q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"{WHERE}: q, k and v must be on one device; got {q.device}, {k.device}, {v.device}.")
    _triton.check_contiguous(WHERE, q=q, k=k, v=v)
    if not isinstance(causal, bool):
        raise ValueError(f"{WHERE}: causal must be True or False; got {causal!r}.")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)):
        raise ValueError(f"{WHERE}: scale must be a number or None (1/sqrt(head_dim)); got {scale!r}.")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{WHERE}: scale must be finite; got {scale}.")


def flash_attention(q, k, v, causal: bool = True, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of every position of a prompt to the keys before it (causal) or to all of them.

    q: [batch, num_heads, seq, head_dim]; k, v: [batch, num_kv_heads, seq, head_dim], num_heads a
    multiple of num_kv_heads; float16, bfloat16 or float32, contiguous, on one device.
    scale: softmax scale, default 1/sqrt(head_dim).
    backend: "auto" (Triton on CUDA, the torch reference otherwise), "triton" (CUDA, or CPU with
    TRITON_INTERPRET=1) or "torch".
    Returns [batch, num_heads, seq, head_dim] in q's dtype; scores, softmax and sums in fp32.
    """
    _check_inputs(q, k, v, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _triton.resolve_backend(backend, WHERE, q, k, v) == "torch":
        return flash_attention_torch(q, k, v, causal, scale)
    return _flash_attention_triton(q, k, v, causal, scale)


# --- the torch references ----------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[batch, num_kv_heads, seq, d] -> [batch, num_kv_heads · group, seq, d]: KV head j serves query
    heads j·group .. j·group + group - 1 (transformers' repeat_kv)."""
    return x.repeat_interleave(group, dim=1)


def flash_attention_torch(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """The plain reference: softmax(Q·Kᵀ·scale + causal mask)·V with the whole [seq, seq] matrix.

    q: [batch, num_heads, seq, head_dim]; k, v: [batch, num_kv_heads, seq, head_dim].
    fp32 math, q's dtype out."""
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = repeat_kv(k.float(), group), repeat_kv(v.float(), group)  # [batch, num_heads, seq, head_dim]
    scores = q.float() @ k.transpose(-1, -2) * scale  # [batch, num_heads, seq, seq]
    if causal:
        seq = q.shape[2]
        above = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)  # key after query
        scores = scores.masked_fill(above, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def flash_attention_tiled_torch(
    q, k, v, causal: bool = True, scale: float | None = None, block_m: int = 64, block_n: int = 16
) -> torch.Tensor:
    """The kernel's algorithm in torch, tile by tile (FlashAttention, Algorithm 1): for each tile of
    block_m queries, walk the key tiles of block_n with a running max m, sum l and output acc. All
    batches and heads at once; a program of the kernel is one (batch, head, query tile) of this loop.

    q: [batch, num_heads, seq, head_dim]; k, v: [batch, num_kv_heads, seq, head_dim]. fp32 math, q's
    dtype out. Equal to flash_attention_torch up to fp32 rounding (another order of summation)."""
    _, num_heads, seq, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k, v = repeat_kv(k.float(), group), repeat_kv(v.float(), group)
    out = torch.empty_like(q)
    for start_m in range(0, seq, block_m):
        qi = q[:, :, start_m : start_m + block_m].float()  # [batch, num_heads, bm, head_dim] (the tail: < block_m)
        rows = torch.arange(start_m, start_m + qi.shape[2], device=q.device)  # query positions
        m = torch.full(qi.shape[:3], float("-inf"), device=q.device)  # [batch, num_heads, bm] running max
        l = torch.zeros(qi.shape[:3], device=q.device)  # running sum of exp(s - m)
        acc = torch.zeros(qi.shape, device=q.device)  # running sum of exp(s - m) · v
        end = min(start_m + block_m, seq) if causal else seq  # key tiles past the last query: skipped
        for start_n in range(0, end, block_n):
            kj, vj = k[:, :, start_n : start_n + block_n], v[:, :, start_n : start_n + block_n]
            s = qi @ kj.transpose(-1, -2) * scale  # [batch, num_heads, bm, bn]: this tile's scores only
            if causal:
                cols = torch.arange(start_n, start_n + kj.shape[2], device=q.device)
                s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))  # key 0 is in the first tile: m_new is finite
            alpha = torch.exp(m - m_new)  # rescales what was summed under the old max (0 at first)
            p = torch.exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vj
            m = m_new
        out[:, :, start_m : start_m + block_m] = (acc / l[..., None]).to(q.dtype)
    return out


# --- memory traffic ----------------------------------------------------------------------------------


def attention_traffic(
    batch: int,
    heads: int,
    kv_heads: int,
    seq: int,
    head_dim: int,
    dtype_bytes: int,
    block_m: int,
    causal: bool = True,
) -> dict:
    """Bytes that attention moves to and from device memory, caches aside, for q [batch, heads, seq,
    head_dim] and k, v [batch, kv_heads, seq, head_dim] of dtype_bytes per element.

    minimum: Q, K and V read once, O written once.
    naive: the paper's Algorithm 0 (S = Q·Kᵀ, P = softmax(S), O = P·V as three kernels): the minimum
        plus S written and read back and P written and read back, [batch, heads, seq, seq] each, in the
        input dtype (eager code adds passes: scaling, masking, an fp32 softmax).
    tiled: this module's kernel with query tiles of block_m: Q read once, O written once, S and P never
        stored, and K and V read by every (query head, query tile) program, up to the tile's last query
        when causal (keys past the sequence are masked, not read).
    scores: the naive version's extra traffic, 4 · batch · heads · seq² elements.
    kv_tiled: the tiled kernel's K and V reads.
    """
    q_bytes = batch * heads * seq * head_dim * dtype_bytes  # = O's
    kv_bytes = batch * kv_heads * seq * head_dim * dtype_bytes  # K's = V's
    minimum = 2 * q_bytes + 2 * kv_bytes
    scores = 4 * batch * heads * seq * seq * dtype_bytes
    tiles = -(-seq // block_m)
    keys_read = sum(min((i + 1) * block_m, seq) if causal else seq for i in range(tiles))  # per query head
    kv_tiled = 2 * batch * heads * keys_read * head_dim * dtype_bytes
    return dict(minimum=minimum, naive=minimum + scores, tiled=2 * q_bytes + kv_tiled, scores=scores, kv_tiled=kv_tiled)


# --- the Triton kernel -------------------------------------------------------------------------------


@jit
def _flash_attention_kernel(
    out_ptr,  # [batch, num_heads, seq, head_dim]
    q_ptr,  # [batch, num_heads, seq, head_dim]
    k_ptr,  # [batch, num_kv_heads, seq, head_dim]
    v_ptr,  # [batch, num_kv_heads, seq, head_dim]
    scale,
    num_heads,
    num_kv_heads,
    seq_len,
    head_dim,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program (>= 16: tl.dot's smallest tile)
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of 2 (>= 16)
    FP32_MATH: tl.constexpr,  # upcast q, k, v to fp32 before the dots (bf16 in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32, "tf32" (= default) otherwise
):
    # One program per (query tile, head, batch). Causal tiles differ in work (tile i reads i + 1
    # tiles of keys): the last tiles, the longest, run first, so the short ones fill the end.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // (num_heads // num_kv_heads)  # GQA: this head's KV head
    q_base = (batch * num_heads + head).to(tl.int64) * seq_len * head_dim  # int64: may exceed 2^31 elements
    kv_base = (batch * num_kv_heads + kv_head).to(tl.int64) * seq_len * head_dim

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    d_mask = offs_d < head_dim
    q_offs = q_base + offs_m[:, None] * head_dim + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + q_offs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # read once, kept
    if FP32_MATH:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp(score - m_i) · v
    # Causal: the key tiles after the tile's last query (above the diagonal) are never visited.
    end = tl.minimum((pid_m + 1) * BLOCK_M, seq_len) if CAUSAL else seq_len
    for start in range(0, end, BLOCK_N):
        keys = start + offs_n  # [BLOCK_N] key positions
        kv_offs = kv_base + keys[:, None] * head_dim + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = (keys < seq_len)[:, None] & d_mask[None, :]  # never read past the sequence or the head
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32, in registers
        valid = (keys < seq_len)[None, :]
        if CAUSAL:
            valid = valid & (keys[None, :] <= offs_m[:, None])  # query i sees keys 0..i
        # Every row has a valid key in the first tile (key 0; rows past seq_len too), so the running max
        # is finite from then on and exp(m_old - m_new) never meets -inf - (-inf).
        s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v)  # rescale by exp(m_old - m_new), add the tile

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _flash_meta(head_dim: int, dtype: torch.dtype, arch: int | None = None) -> dict:
    """The kernel's compile-time constants, warps and pipeline stages for a GPU of compute capability
    `arch` (75 for sm75; None: the interpreter, or unknown). labkit.kernels.offline compiles the same, at
    LLaMA-7B's head_dim 128, for sm75 to sm90; python -m labkit.kernels.offline shows them.

    sm80 and newer, fp16 and bf16 (tensor cores): 64 queries x 64 keys per step, with 3 stages of K/V
    loads in flight (2 on sm86/sm89, whose blocks get 99 KB of shared memory, not 163-227 KB). sm90:
    4 warps. On the H200 (benchmarks/gpu_check_runs.md, 2026-12-04, causal, 32 heads of 128, 2048
    tokens) this took 133 us where SDPA took 110 us; of the tiles tried, 64 x 32 took 150 us, 128 x 64
    (8 warps, 3 stages) 183 us, 128 x 32 (8 warps) 230 us, and 64 x 16 (8 warps) 373 us. sm80-sm89:
    8 warps, because with 4 the tile spills registers there (Triton 3.6 and 3.9; not timed on those GPUs).
    Otherwise (fp32, the T4, the interpreter): 64 x 16, 8 warps. On sm75 Triton (3.6 and 3.9) has no
    tensor-core tl.dot: it lowers both dots to CUDA-core FMAs that hold each thread's rows and columns of
    the operands across the whole inner dimension in registers, and this is the largest tile found that
    does not spill there (128 x 64 with 8 warps spilled 9 KB per thread, 64 x 32 with 8 warps half a KB;
    64 x 16 uses 235 of 255 registers). fp32 dots are exact ("ieee") FMAs on every GPU, so the same
    tile. Tuned at head_dim 128; larger heads hold more per thread."""
    meta = dict(
        BLOCK_D=max(16, _triton.next_power_of_2(head_dim)),
        FP32_MATH=_triton.compute_in_fp32(dtype),
        PRECISION=_triton.dot_precision(dtype),
    )
    if arch is not None and arch >= 80 and dtype in (torch.float16, torch.bfloat16):
        return meta | dict(
            BLOCK_M=64, BLOCK_N=64, num_warps=4 if arch >= 90 else 8, num_stages=2 if arch in (86, 89) else 3
        )
    return meta | dict(BLOCK_M=64, BLOCK_N=16, num_warps=8)


def _flash_attention_triton(q, k, v, causal: bool, scale: float, meta: dict | None = None) -> torch.Tensor:
    """Launch the kernel; meta: _flash_meta's choice, or tiles of your own (tests use small ones)."""
    batch, num_heads, seq, head_dim = q.shape
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if meta is None:
        major, minor = (None, 0) if not q.is_cuda else torch.cuda.get_device_capability(q.device)
        meta = _flash_meta(head_dim, q.dtype, None if major is None else 10 * major + minor)
    grid = (-(-seq // meta["BLOCK_M"]), num_heads, batch)  # query tiles of one head side by side: they share K, V
    _flash_attention_kernel[grid](out, q, k, v, scale, num_heads, k.shape[1], seq, head_dim, CAUSAL=causal, **meta)
    return out
