"""Worked solutions of lesson 11's exercises (see labkit.solutions)."""

from __future__ import annotations


def bubble_fraction(p, m):
    # The pass takes m + p - 1 slots; each rank is busy in m of them.
    return (p - 1) / (m + p - 1)


def column_shards(weight, world_size):
    # Contiguous blocks of output rows: rank r computes output features [r*out/W, (r+1)*out/W).
    return list(weight.chunk(world_size, dim=0))


def ring_bytes_per_token(hidden, layers, dtype_bytes, world_size):
    payload = 2 * layers * hidden * dtype_bytes  # two all-reduces per layer, one hidden vector each
    return 2 * (world_size - 1) / world_size * payload  # reduce-scatter + all-gather
