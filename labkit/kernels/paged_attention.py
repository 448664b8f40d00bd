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
transformers' repeat_kv does.

Memory traffic of one decode step (what bounds its speed): every cached K and V element is read
once, 2 · context · num_kv_heads · head_dim · bytes per sequence; q, the output and the block table
are negligible. The torch reference first gathers the blocks into a contiguous copy (read + write +
read again) and materialises the scores; the kernel reads each K/V tile once, straight from its
block, and keeps scores in registers.
"""

from __future__ import annotations

import math

import torch

from . import _triton
from ._triton import jit


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
    if not check_values or num_seqs == 0:
        return
    # Value checks read the tensors (a device sync on GPU): they guard the kernel's address arithmetic.
    capacity = block_tables.shape[1] * block_size
    lens = context_lens.long()
    if lens.min().item() < 1:
        raise ValueError(
            f"{where}: every context length must be >= 1 (the new token's own K/V is in the "
            f"cache); got min {lens.min().item()}."
        )
    if lens.max().item() > capacity:
        raise ValueError(
            f"{where}: context length {lens.max().item()} exceeds the block table's capacity "
            f"{block_tables.shape[1]} blocks x {block_size} tokens = {capacity}."
        )
    used = (
        torch.arange(block_tables.shape[1], device=lens.device)[None, :]
        < ((lens + block_size - 1) // block_size)[:, None]
    )
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))  # [num_seqs, max_blocks_per_seq]
    if bad.any():
        s, b = (int(i) for i in bad.nonzero()[0])
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
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q: [num_seqs, num_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq] int32; context_lens: [num_seqs] int32 (>= 1)
    scale: softmax scale, default 1/sqrt(head_dim).
    backend: "auto" (Triton on CUDA, torch otherwise), "triton" (CUDA, or CPU with TRITON_INTERPRET=1)
    or "torch". check_values: validate context lengths and used block-table entries (costs a sync).
    Returns [num_seqs, num_heads, head_dim] in q's dtype; softmax and sums are accumulated in fp32.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, check_values)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _triton.resolve_backend(backend, "paged_attention_decode", q, k_cache, v_cache) == "torch":
        return paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
    return _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None):
    """The plain reference: gather each sequence's blocks into a contiguous K/V, then softmax(q·Kᵀ)·V.

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq]; context_lens: [num_seqs]. fp32 math, q's dtype out.
    """
    num_seqs, num_heads, head_dim = q.shape
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
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of 2 >= 16 (tl.dot's minimum tile)
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of 2
    BLOCK_N: tl.constexpr,  # tokens per loop step (may span several cache blocks)
    FP32_MATH: tl.constexpr,  # upcast K/V/q to fp32 before the dots (bf16 in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32, "tf32" (= default) otherwise
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
    if FP32_MATH:
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
        if FP32_MATH:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Online softmax: rescale what was accumulated under the old max (FlashAttention, Alg. 1).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [BLOCK_G, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
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
        GROUP=group,
        BLOCK_G=max(16, _triton.next_power_of_2(group)),
        BLOCK_D=max(16, _triton.next_power_of_2(head_dim)),
        BLOCK_N=64 if q.element_size() <= 2 else 32,  # fp32 tiles: stay within 64 KB of shared memory (T4)
        FP32_MATH=_triton.compute_in_fp32(q.dtype),
        PRECISION=_triton.dot_precision(q.dtype),
    )
    return out
