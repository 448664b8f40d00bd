"""Checks for lesson 09 (the KV cache and paged attention): the online-softmax step of the Triton
kernel (the lesson's "build it": the paged-attention kernel of section 5 calls it for every tile), the
cache's bytes per token, the slot a block table gives a token, and the memory a paged cache wastes.

    check.lesson09.online_softmax_step(my_step)   # a @triton.jit function
    check.lesson09.kv_bytes_per_token(my_kv_bytes_per_token)
    check.lesson09.slot(my_slot)
    check.lesson09.paged_waste(my_paged_waste)
"""

from __future__ import annotations

import math

import torch

try:
    import triton.language as tl
except ImportError:  # the other checks work without triton; the kernel check says how to get it
    tl = None

from ..kernels._triton import jit
from ..serving import block_manager
from . import Verdict, as_number, call, describe, exercise, tensor_like
from ._numbers import number_with_hints


def _configs():
    from transformers import LlamaConfig

    return [  # grouped-query attention first, so that query heads and KV heads differ
        (
            "SmolLM2-135M (30 layers, 9 query / 3 KV heads of 64)",
            LlamaConfig(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
            ),
        ),
        (
            "a LLaMA-2-70B shape (80 layers, 64 query / 8 KV heads of 128)",
            LlamaConfig(
                hidden_size=8192,
                intermediate_size=28672,
                num_hidden_layers=80,
                num_attention_heads=64,
                num_key_value_heads=8,
            ),
        ),
        (
            "LLaMA-7B (32 layers, 32 heads of 128)",
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
            ),
        ),
    ]


@exercise
def kv_bytes_per_token(fn) -> bool:
    """fn(config, dtype_bytes) -> int: 2 (K and V) · layers · KV heads · head_dim · bytes per element."""
    v = Verdict("kv_bytes_per_token")
    for label, cfg in _configs():
        for dtype_bytes in (2, 4):
            expected = block_manager.kv_bytes_per_token(cfg, dtype_bytes)
            layers, kv, heads = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
            d = cfg.hidden_size // heads
            got = call(v, fn, cfg, dtype_bytes)
            if not number_with_hints(
                v,
                got,
                expected,
                f"the bytes per token of {label} at {dtype_bytes} bytes per element",
                hints={
                    "forgot the factor 2: the cache holds a key AND a value per KV head": expected // 2,
                    "used the query heads (num_attention_heads) instead of num_key_value_heads: with grouped-query "
                    "attention several query heads share one cached K/V head": 2 * layers * heads * d * dtype_bytes,
                    "used the query heads and forgot the factor 2": layers * heads * d * dtype_bytes,
                    "forgot the layers: every decoder layer keeps its own keys and values": 2 * kv * d * dtype_bytes,
                    "counted bits, not bytes": 8 * expected,
                    "left out the bytes per element (that counts elements, not bytes)": 2 * layers * kv * d,
                },
            ):
                return v.report()
    return v.report("2 · layers · KV heads · head_dim · bytes: labkit.serving.kv_bytes_per_token.")


@exercise
def slot(fn) -> bool:
    """fn(block_table: list[int], block_size, t) -> int: the flat slot of token t, block_table[t // B] · B + t % B."""
    v = Verdict("slot")
    for table, block_size in [([5, 2, 7, 0], 4), ([3, 9, 1], 16)]:
        n = len(table) * block_size
        positions = range(n)
        got = [call(v, fn, list(table), block_size, t) for t in positions]
        if v.problem:
            break
        values = [as_number(x) for x in got]
        if None in values:
            t = values.index(None)
            v.fail(f"a slot should be a number; got {describe(got[t])} for token {t}.")
            break
        if not all(x.is_integer() for x in values):
            v.fail(f"slots are whole numbers (indices into the pool); got {values[:6]}...")
            break
        got_t = torch.tensor([int(x) for x in values])
        t = torch.arange(n)
        tab = torch.tensor(table)
        expected = tab[t // block_size] * block_size + t % block_size
        hints = {
            "returned the logical position t: look up the physical block in the table, block_table[t // B]": t,
            "forgot to multiply the physical block by the block size (block_table[t // B] · B + t % B)": tab[
                t // block_size
            ]
            + t % block_size,
            "returned the physical block, not the slot inside the pool (add the offset t % B)": tab[t // block_size],
            "swapped block index and offset: the block is t // B and the offset t % B": tab[
                (t % block_size) % len(table)
            ]
            * block_size
            + t // block_size,
        }
        if not tensor_like(
            v,
            got_t,
            expected,
            f"the slot of each token 0..{n - 1} (table {table}, B={block_size})",
            atol=0,
            rtol=0,
            hints=hints,
        ):
            break
    return v.report("The arithmetic of BlockManager.slot and of the paged-attention kernel.")


@exercise
def paged_waste(fn) -> bool:
    """fn(lengths: list[int], block_size) -> float: the fraction of the paged cache's reserved slots that hold
    no token, 1 − Σ n / Σ ceil(n / B) · B."""
    v = Verdict("paged_waste")
    for lengths, block_size in [([17, 1, 16, 40, 5], 16), ([3, 8, 9, 100, 33, 64], 8)]:
        expected = block_manager.kv_memory_waste(lengths, max(lengths), block_size)["paged_waste"]
        used = sum(lengths)
        reserved = sum(math.ceil(n / block_size) * block_size for n in lengths)
        floor = sum(n // block_size * block_size for n in lengths)
        got = call(v, fn, list(lengths), block_size)
        if not number_with_hints(
            v,
            got,
            expected,
            f"the waste for lengths {lengths}, B={block_size}",
            rtol=1e-6,
            hints={
                f"rounded the blocks down: a sequence of {lengths[0]} tokens needs ceil({lengths[0]} / {block_size}) "
                f"blocks, the last one partly empty": 1 - used / floor if floor else float("nan"),
                (
                    "averaged each request's waste fraction; the waste is of the "
                    "whole pool: 1 − (tokens) / (slots reserved)"
                ): sum(1 - n / (math.ceil(n / block_size) * block_size) for n in lengths) / len(lengths),
                "returned the fraction used (tokens / slots), not the fraction wasted": used / reserved,
                "returned the number of wasted slots, not the fraction": reserved - used,
                "measured against a whole block per request beyond what it needs (ceil(n / B) + 1 blocks)": 1
                - used / sum((math.ceil(n / block_size) + 1) * block_size for n in lengths),
            },
        ):
            break
    return v.report("Only the tail of each sequence's last block is wasted: labkit.serving.kv_memory_waste.")


# --- the build-it: one tile of the online softmax, in Triton -------------------------------------------


@jit
def _step_kernel(
    m_ptr,  # [G]
    l_ptr,  # [G]
    acc_ptr,  # [G, D]
    s_ptr,  # [G, N]
    v_ptr,  # [N, D]
    out_m_ptr,
    out_l_ptr,
    out_acc_ptr,
    G: tl.constexpr,
    N: tl.constexpr,
    D: tl.constexpr,
    STEP: tl.constexpr,
):
    # One program: the state of G query heads, one tile of N scores and values, through the learner's STEP.
    g, n, d = tl.arange(0, G), tl.arange(0, N), tl.arange(0, D)
    m = tl.load(m_ptr + g)
    l_sum = tl.load(l_ptr + g)
    acc = tl.load(acc_ptr + g[:, None] * D + d[None, :])
    s = tl.load(s_ptr + g[:, None] * N + n[None, :])
    v = tl.load(v_ptr + n[:, None] * D + d[None, :])
    m, l_sum, acc = STEP(m, l_sum, acc, s, v)
    tl.store(out_m_ptr + g, m)
    tl.store(out_l_ptr + g, l_sum)
    tl.store(out_acc_ptr + g[:, None] * D + d[None, :], acc)


def _tile_state(seed: int, G: int, first: bool, big: bool):
    """(m, l, acc, s, v) of one tile: N = D = 16; s with two masked (-inf) tokens; big: scores near 95,
    where exp(score) overflows fp32 without the max subtracted."""
    g = torch.Generator().manual_seed(seed)
    N = D = 16
    s = torch.randn(G, N, generator=g) * 3 + (95.0 if big else 0.0)
    s[:, -2:] = -math.inf  # tokens past the context
    v = torch.randn(N, D, generator=g)
    if first:
        m, l_sum, acc = torch.full((G,), -math.inf), torch.zeros(G), torch.zeros(G, D)
    else:
        m = s[:, :-2].max(1).values + torch.linspace(-4, 4, G)  # some heads' max grows, others' does not
        l_sum = torch.rand(G, generator=g) * 5 + 1
        acc = torch.randn(G, D, generator=g) * l_sum[:, None]
    return m, l_sum, acc, s, v


def _reference_step(m, l_sum, acc, s, v, *, rescale_acc=True, rescale_l=True, old_max=False, no_max=False):
    """The FlashAttention update in float64, and the slips named in the check's hints."""
    m, l_sum, acc, s, v = (t.double() for t in (m, l_sum, acc, s, v))
    m_new = torch.maximum(m, s.max(1).values)
    alpha = torch.exp(m - m_new)
    p = torch.exp(s - (m if old_max else m_new)[:, None]) if not no_max else torch.exp(s)
    l_new = (l_sum * alpha if rescale_l else l_sum) + p.sum(1)
    acc_new = (acc * alpha[:, None] if rescale_acc else acc) + p @ v
    return m_new, l_new, acc_new


def _run_step(fn, state, device):
    m, l_sum, acc, s, v = (t.to(device).contiguous() for t in state)
    out = [torch.full_like(t, math.nan) for t in (m, l_sum, acc)]
    G, N = s.shape
    _step_kernel[(1,)](m, l_sum, acc, s, v, *out, G=G, N=N, D=v.shape[1], STEP=fn)
    return [t.cpu() for t in out]


@exercise
def online_softmax_step(fn) -> bool:
    """fn: a @triton.jit function step(m_i, l_i, acc, s, v) -> (m_new, l_new, acc_new), the update of the
    Triton kernel's running state after one tile (FlashAttention, Algorithm 1): m_i, l_i [G] fp32, the
    running max of the scores and the running sum of exp(score − m_i); acc [G, D] fp32, the running sum
    of exp(score − m_i) · v; s [G, N] fp32, the tile's scaled scores (−inf past the context); v [N, D].
    m_new = max(m_i, max_j s_j), α = exp(m_i − m_new), p = exp(s − m_new), l_new = α·l_i + Σ_j p_j,
    acc_new = α·acc + p·v (labkit.kernels.weighted_sum(p, v) computes p·v for any G)."""
    from ..kernels import _triton, paged_attention

    v = Verdict("online_softmax_step")
    if not (_triton.available() and (_triton.interpreted() or torch.cuda.is_available())):
        v.fail(
            "a Triton function runs on a CUDA GPU or in Triton's CPU interpreter; set TRITON_INTERPRET=1 before "
            "importing labkit.kernels (the lesson's first cells do) and restart the kernel."
        )
        return v.report()
    if not (callable(fn) and hasattr(fn, "fn")) or isinstance(fn, _triton._LazyKernel):
        v.fail(f"pass a function decorated with @triton.jit (got {describe(fn)}); the kernel calls it on every tile.")
        return v.report()
    device = _triton.device()
    cases = [
        ("the first tile (m = −inf, l = 0, acc = 0), 16 query heads", 1, 16, True, False),
        ("a later tile, 16 query heads, some of whose maxima grow", 2, 16, False, False),
        ("a later tile, one query head", 3, 1, False, False),
        ("the first tile, one query head", 4, 1, True, False),
        ("a later tile with scores near 95 (exp(95) overflows fp32)", 5, 16, False, True),
    ]
    for what, seed, G, first, big in cases:
        state = _tile_state(seed, G, first, big)
        try:
            m, l_sum, acc = _run_step(fn, state, device)
        except Exception as error:  # the learner's code, compiled or interpreted: in words
            text = str(error).strip().splitlines()
            v.fail(f"running it on {what} raised {type(error).__name__}: {(text[-1] if text else '')[:300]}")
            return v.report()
        if all(torch.equal(a, b) for a, b in zip((m, l_sum, acc), state[:3])):
            v.fail("not written yet: it returns the state it was given, unchanged.")
            return v.report()
        expected = _reference_step(*state)
        m_hints = {
            "returned the old maximum m_i: m_new = max(m_i, the tile's largest score)": state[0].double(),
            "took the tile's maximum alone: keep the larger of it and m_i": state[3].double().max(1).values,
        }
        l_hints = {
            "forgot to rescale l: l_new = α · l_i + Σ p, α = exp(m_i − m_new)": _reference_step(
                *state, rescale_l=False
            )[1],
            "used the old maximum in p = exp(s − m): subtract m_new": _reference_step(*state, old_max=True)[1],
            "forgot to subtract the maximum: p = exp(s − m_new)": _reference_step(*state, no_max=True)[1],
        }
        acc_hints = {
            "forgot to rescale acc: acc_new = α · acc + p · v": _reference_step(*state, rescale_acc=False)[2],
            "divided acc by l inside the step: the kernel divides once, after the last tile": (
                expected[2] / expected[1][:, None]
            ),
        }
        where = f" after {what}"
        checks = [
            (m, expected[0], "m", m_hints),
            (l_sum, expected[1], "l", l_hints),
            (acc, expected[2], "acc", acc_hints),
        ]
        for got, want, name, hints in checks:
            if not tensor_like(v, got, want.float(), name + where, atol=1e-5, rtol=1e-5, hints=hints):
                return v.report()
    # the whole kernel with this step: GQA, several tiles, a one-token context
    q, k_cache, v_cache, tables, lens = _paged_example()
    args = [t.to(device) for t in (q, k_cache, v_cache, tables, lens)]
    got = paged_attention.paged_attention_decode(*args, backend="triton", step=fn).cpu()
    want = paged_attention.paged_attention_decode_torch(q, k_cache, v_cache, tables, lens)
    if not tensor_like(v, got, want, "the paged-attention output with your step", atol=1e-5, rtol=1e-4):
        return v.report()
    return v.report("The running max, sum and output of the online softmax: the kernel never holds a row of scores.")


def _paged_example():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, 6, 32, generator=g)  # 3 sequences, 6 query heads of 32, 2 KV heads
    k_cache, v_cache = torch.randn(9, 16, 2, 32, generator=g), torch.randn(9, 16, 2, 32, generator=g)
    tables = torch.tensor([[4, 0, 7], [2, 8, 0], [5, 0, 0]], dtype=torch.int32)
    return q, k_cache, v_cache, tables, torch.tensor([40, 17, 1], dtype=torch.int32)
