"""Paged attention for decoding: one new token per sequence attends to its whole KV cache, which
lives in fixed-size blocks scattered over a shared pool and is found through a block table
(vLLM, Kwon et al. 2023). The kernel walks the blocks with an online softmax (FlashAttention's
running max and sum, Dao et al. 2022), so no [num_heads, context] score matrix is ever stored.

Layouts (shapes are the documentation):
    q            [num_seqs, num_heads, head_dim]                       the new token's queries
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]       one pool per layer
    v_cache      [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables [num_seqs, max_blocks_per_seq] int32                 logical block -> physical block
    context_lens [num_seqs] int32                                      tokens in cache, new one included
Token t of sequence s is at k_cache[block_tables[s, t // block_size], t % block_size].
Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads), as
transformers' repeat_kv does. One program serves a KV head and all its query heads, with tl.dot
(whose tiles are at least 16 rows: the group is padded to 16); with one query head per KV head
(LLaMA-7B) a dot would be 15/16 padding, so the kernel multiplies and sums instead.

Memory traffic of one decode step (what bounds its speed): every cached K and V element is read
once, 2 · context · num_kv_heads · head_dim · bytes per sequence; q, the output and the block table
are negligible. The torch reference first gathers the blocks into a contiguous copy (read + write +
read again) and materialises the scores; the kernel reads each K/V tile once, straight from its
block, and keeps scores in registers.
"""

from __future__ import annotations

import math

import torch

try:
    import triton.language as tl
except ImportError:  # triton is a dependency on Linux only: the torch references work without it, and
    tl = None  # a Triton launch says how to install it (_triton.load)

from . import _triton
from ._triton import device_function, jit


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, check_values: bool = True):
    """Shapes, dtypes, contiguity and (check_values) every used block-table entry, with clear errors."""
    where = "paged_attention_decode"
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(t).__name__}.")
    if q.dim() != 3:
        raise ValueError(f"{where}: q must be [num_seqs, num_heads, head_dim]; got shape {tuple(q.shape)}.")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{where}: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}."
        )
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"{where}: head_dim mismatch: q has {head_dim}, the KV cache has {cache_head_dim}.")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{where}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} "
            f"(grouped-query attention shares each KV head among a whole number of query heads)."
        )
    _triton.check_float(where, q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"{where}: q, k_cache and v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}."
        )
    for name in ("block_tables", "context_lens"):
        if tensors[name].dtype != torch.int32:
            raise ValueError(
                f"{where}: {name} must be int32 (as in vLLM); got {tensors[name].dtype}. Use .to(torch.int32)."
            )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"{where}: block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq]; got {tuple(block_tables.shape)}."
        )
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"{where}: context_lens must be [num_seqs={num_seqs}]; got {tuple(context_lens.shape)}.")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"{where}: all tensors must be on one device; got {sorted(map(str, devices))}.")
    _triton.check_contiguous(where, **tensors)
    if check_values:
        check_block_tables(block_tables, context_lens, num_blocks, block_size)


def check_block_tables(block_tables, context_lens, num_blocks: int, block_size: int) -> None:
    """Every context length in [1, capacity] and every block-table entry a sequence uses in
    [0, num_blocks): the values the kernel's address arithmetic trusts.

    block_tables: [num_seqs, max_blocks_per_seq]; context_lens: [num_seqs]. On CPU tensors this is
    cheap (the serving engine checks its tables here once per step, before copying them to the GPU);
    on GPU tensors it costs one device sync.
    """
    where = "paged_attention_decode"
    if context_lens.numel() == 0:
        return
    width = block_tables.shape[1]
    capacity = width * block_size
    lens = context_lens.long()
    used = torch.arange(width, device=lens.device)[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))  # [num_seqs, max_blocks_per_seq]
    summary = torch.stack([lens.min(), lens.max(), bad.any().long(), bad.flatten().long().argmax()])
    shortest, longest, any_bad, first_bad = summary.tolist()  # one device sync for all the checks
    if shortest < 1:
        raise ValueError(
            f"{where}: every context length must be >= 1 (the new token's own K/V is in the cache); got min {shortest}."
        )
    if longest > capacity:
        raise ValueError(
            f"{where}: context length {longest} exceeds the block table's capacity "
            f"{width} blocks x {block_size} tokens = {capacity}."
        )
    if any_bad:
        s, b = divmod(first_bad, width)
        raise ValueError(
            f"{where}: block table entry {int(block_tables[s, b])} (sequence {s}, logical block "
            f"{b}) is outside [0, num_blocks={num_blocks})."
        )


def paged_attention_decode(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    scale: float | None = None,
    backend: str = "auto",
    check_values: bool = True,
    step=None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q: [num_seqs, num_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq] int32; context_lens: [num_seqs] int32 (>= 1)
    scale: softmax scale, default 1/sqrt(head_dim).
    backend: "auto" (Triton on CUDA, torch otherwise), "triton" (CUDA, or CPU with TRITON_INTERPRET=1)
    or "torch". check_values: validate context lengths and used block-table entries (one device sync
    on GPU; a caller that built the tables on CPU checks them there with check_block_tables and
    passes False).
    step: None (labkit's online_softmax_step) or your own @triton.jit function of its signature (lesson
    09's "build it"), the update of the running max, sum and output that the Triton kernel calls for every
    tile of the context (the torch backend has no tiles).
    Returns [num_seqs, num_heads, head_dim] in q's dtype; softmax and sums are accumulated in fp32.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, check_values)
    check_step(step)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _triton.resolve_backend(backend, "paged_attention_decode", q, k_cache, v_cache) == "torch":
        return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
    return _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, step)


def check_step(step) -> None:
    """None or a function Triton can call from a kernel (decorated with @triton.jit); else ValueError."""
    if step is None:
        return
    if not (callable(step) and hasattr(step, "fn")) or isinstance(step, _triton._LazyKernel):
        raise ValueError(
            f"step={step!r}: pass a function decorated with @triton.jit, step(m_i, l_i, acc, s, v) -> (m, l, acc) "
            f"(labkit.kernels.paged_attention.online_softmax_step's signature), or None for labkit's own."
        )


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None):
    """The plain reference: gather each sequence's blocks into a contiguous K/V, then softmax(q·Kᵀ)·V.

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq]; context_lens: [num_seqs]. fp32 math, q's dtype out.
    """
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    for s, n in enumerate(context_lens.tolist()):
        blocks = block_tables[s, : (n + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()  # [n, num_kv_heads, head_dim]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        scores = torch.einsum("hd,nhd->hn", q[s].float(), k) * scale  # [num_heads, n]
        out[s] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@device_function
def weighted_sum(p, v):
    """p [G, N] fp32 · v [N, D] -> [G, D] fp32: the attention weights of a tile times its values. A tl.dot
    (tensor cores; its tiles are at least 16 rows, so G is padded to 16) for a group of query heads; a
    multiply and sum for one query head (G == 1, LLaMA-7B), where a dot would be 15/16 padding."""
    if p.shape[0] == 1:
        return tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]
    if v.dtype == tl.float32:
        return tl.dot(p, v, input_precision="ieee")  # fp32 in, fp32 math (no TF32 rounding)
    return tl.dot(p.to(v.dtype), v)


@device_function
def online_softmax_step(m_i, l_i, acc, s, v):
    """One tile of the online softmax (FlashAttention, Dao et al. 2022, Algorithm 1): the running state of
    each query head after the tile's scores s [G, N] (fp32, scaled, -inf past the context) and values v [N, D].

    m_i: [G] running max of the scores; l_i: [G] running sum of exp(score - m_i); acc: [G, D] running sum
    of exp(score - m_i) · v, all fp32. Returns (m_new, l_new, acc_new); the output is acc / l at the end."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max (0 on the first tile)
    p = tl.exp(s - m_new[:, None])  # [G, N]
    l_new = l_i * alpha + tl.sum(p, 1)
    acc_new = acc * alpha[:, None] + weighted_sum(p, v)
    return m_new, l_new, acc_new


@jit
def _paged_attention_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    context_lens_ptr,  # [num_seqs] int32
    scale,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    max_blocks_per_seq,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # 1 if GROUP == 1 (no tl.dot); else GROUP padded to a power of 2 >= 16 (tl.dot's minimum)
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of 2
    BLOCK_N: tl.constexpr,  # tokens per loop step (may span several cache blocks)
    FP32_MATH: tl.constexpr,  # upcast K/V/q to fp32 before the dots (bf16 in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32, "tf32" (= default) otherwise
    STEP: tl.constexpr,  # the online-softmax update of one tile: online_softmax_step, or yours
):
    # One program per (sequence, KV head): it serves all GROUP query heads that share this KV head,
    # so each K/V element is read from memory once, not GROUP times.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this group
    q_offs = (seq * num_heads + heads)[:, None] * head_dim + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if FP32_MATH or BLOCK_G == 1:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of exp(score - m_i) · v
    for start in range(0, ctx_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] token positions
        n_mask = offs_n < ctx_len
        # Block table: one 4-byte read per token (cached) against 2 · head_dim · bytes of K/V.
        block = tl.load(block_tables_ptr + seq * max_blocks_per_seq + offs_n // block_size, mask=n_mask, other=0)
        slot = block.to(tl.int64) * block_size + offs_n % block_size  # int64: pools can exceed 2^31 elements
        kv_offs = (slot * num_kv_heads + kv_head)[:, None] * head_dim + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]  # never read past the context or the head
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if FP32_MATH or BLOCK_G == 1:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        if BLOCK_G == 1:  # one query head: multiply and sum (a tl.dot would be 15 rows of padding in 16)
            s = tl.sum(q * k, 1)[None, :] * scale  # [1, BLOCK_D] · [BLOCK_N, BLOCK_D] -> [1, BLOCK_N] fp32
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = STEP(m_i, l_i, acc, s, v)  # the online softmax: rescale, then add this tile

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _launch_meta(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, step=None) -> dict:
    """The kernel's compile-time constants for these shapes (labkit.kernels.offline compiles the same).
    BLOCK_N: 32 tokens per step. Larger tiles spill registers somewhere (python -m labkit.kernels.offline
    shows it): with tl.dot a 64-token fp16 tile on sm75 (T4), and an fp32 one needs most of its 64 KB of
    shared memory; without tl.dot (one query head per KV head) a 64-token 16-bit tile spilled on sm89 (L4,
    4 warps) and on sm90 (H100, 8 warps) with Triton 3.6, the version on the H200 that benchmarks/
    gpu_check.sh ran on (2026-12-04). The price there: 32 sequences x 1024 tokens, 32 heads of 128, fell
    from 60% to 39% of the H200's bandwidth (bench_kernels.py's target is 30%); a tile per arch would win it
    back."""
    group = num_heads // num_kv_heads
    return dict(
        GROUP=group,
        BLOCK_G=1 if group == 1 else max(16, _triton.next_power_of_2(group)),
        BLOCK_D=max(16, _triton.next_power_of_2(head_dim)),
        BLOCK_N=32,
        FP32_MATH=_triton.compute_in_fp32(dtype),
        PRECISION=_triton.dot_precision(dtype),
        STEP=step or online_softmax_step,
    )


def _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, step=None):
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    grid = (num_seqs, num_kv_heads)
    _paged_attention_decode_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        block_tables.shape[1],
        **_launch_meta(num_heads, num_kv_heads, head_dim, q.dtype, step),
    )
    return out
