"""Checks for lesson 09 (the KV cache and paged attention): the cache's bytes per token, the slot a
block table gives a token, and the memory a paged cache wastes.

    check.lesson09.kv_bytes_per_token(my_kv_bytes_per_token)
    check.lesson09.slot(my_slot)
    check.lesson09.paged_waste(my_paged_waste)
"""

from __future__ import annotations

import math

import torch

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
