"""Checks for lesson 11 (parallelism and offloading)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import Verdict, as_number, call, exercise, number_like, tensor_like


@exercise
def bubble_fraction(fn) -> bool:
    """fn(p, m) -> the idle share of a GPipe forward pass with p stages and m micro-batches."""
    v = Verdict("bubble_fraction")
    for p, m in [(4, 1), (3, 4), (2, 8), (8, 32), (1, 5)]:
        got = call(v, fn, p, m)
        if v.problem:
            break
        expected = (p - 1) / (m + p - 1)
        wrong = {
            "you computed (p - 1) / m, the bubble relative to the busy time (Narayanan et al.'s 'bubble time "
            "fraction'); here it is the share of the total time": (p - 1) / m,
            "you computed the busy share m / (m + p - 1); the bubble is the rest": m / (m + p - 1),
            "you computed p / (m + p); the pipeline takes m + p - 1 time slots, and each rank idles in p - 1 of them": p
            / (m + p),
        }
        value = as_number(got)
        if value is not None and abs(value - expected) > 1e-9:
            for hint, w in wrong.items():
                if abs(value - w) < 1e-9:
                    v.fail(f"for p={p}, m={m} you returned {value:.4g}: {hint}.")
                    break
        if not number_like(v, got, expected, f"the bubble for p={p} stages, m={m} micro-batches", rtol=1e-9):
            break
    return v.report("(p - 1) / (m + p - 1): more micro-batches, smaller bubble.")


@exercise
def column_shards(fn) -> bool:
    """fn(weight [out, in], world_size) -> list of world_size tensors [out / W, in] whose outputs,
    concatenated, equal the whole layer's output."""
    v = Verdict("column_shards")
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(9, 6, generator=g)  # [out, in]
    x = torch.randn(5, 6, generator=g)  # [tokens, in]
    world = 3
    shards = call(v, fn, weight.clone(), world)
    if v.problem is None and (not isinstance(shards, (list, tuple)) or len(shards) != world):
        v.fail(
            f"return a list of {world} tensors (one per rank); got "
            f"{len(shards) if isinstance(shards, (list, tuple)) else type(shards).__name__}."
        )
    if v.problem is None and not all(isinstance(s, torch.Tensor) for s in shards):
        v.fail("every shard should be a torch.Tensor.")
    if v.problem is None and any(s.dtype != weight.dtype for s in shards):
        v.fail(f"the shards have dtypes {[s.dtype for s in shards]}; keep the weight's {weight.dtype}.")
    if v.problem is None and any(tuple(s.shape) != (3, 6) for s in shards):
        shape = tuple(shards[0].shape)
        v.fail(
            f"shard 0 has shape {shape}; expected (3, 6) = [out / W, in]."
            + (
                " You split the input dimension (dim 1): that is the row-parallel split, whose partial "
                "outputs must be summed, not concatenated."
                if shape == (9, 2)
                else ""
            )
        )
    if v.problem is None:
        y = torch.cat([F.linear(x, s) for s in shards], dim=-1)  # [tokens, out]
        interleaved = torch.cat([F.linear(x, weight[r::world]) for r in range(world)], dim=-1)
        tensor_like(
            v,
            y,
            F.linear(x, weight),
            "the concatenated output of the shards",
            hints={
                "gave rank r the rows r, r + W, r + 2W, ... (interleaved): the outputs "
                "come out permuted; give each rank a contiguous block of rows": interleaved
            },
        )
    return v.report("contiguous blocks of output rows: each rank computes its own output columns, no communication.")


@exercise
def ring_bytes_per_token(fn) -> bool:
    """fn(hidden, layers, dtype_bytes, world_size) -> bytes each rank sends per token in the forward
    pass of a tensor-parallel Llama, with ring all-reduces."""
    v = Verdict("ring_bytes_per_token")
    for hidden, layers, nbytes, world in [(4096, 32, 2, 4), (576, 30, 4, 3), (8192, 80, 2, 8)]:
        got = call(v, fn, hidden, layers, nbytes, world)
        if v.problem:
            break
        payload = 2 * layers * hidden * nbytes
        expected = 2 * (world - 1) / world * payload
        wrong = {
            "are off by a factor of 2: count two all-reduces per layer (after attention's o_proj and after "
            "the MLP's down_proj), and 2 (W - 1) / W of the payload per all-reduce (a reduce-scatter plus an "
            "all-gather)": expected / 2,
            "returned the payload (the bytes summed), not what a ring sends: 2 (W - 1) / W times the payload": payload,
            "multiplied by the world size: count what one rank sends": expected * world,
        }
        value = as_number(got)
        if value is not None and abs(value - expected) > 1e-6 * expected:
            for hint, w in wrong.items():
                if abs(value - w) < 1e-6 * w:
                    v.fail(
                        f"for hidden={hidden}, layers={layers}, {nbytes}-byte values, W={world} you returned "
                        f"{value:,.0f}; you {hint}."
                    )
                    break
        if not number_like(
            v, got, expected, f"the bytes per token for hidden={hidden}, layers={layers}, W={world}", rtol=1e-6
        ):
            break
    return v.report("2 all-reduces x layers x hidden x bytes, times 2 (W - 1) / W on a ring.")
