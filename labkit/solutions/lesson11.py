"""Worked solutions of lesson 11's exercises (see labkit.solutions)."""

from __future__ import annotations


def bubble_fraction(p, m):
    # The pass takes m + p - 1 slots; each rank is busy in m of them.
    return (p - 1) / (m + p - 1)


def linear_slices(config, rank, world_size):
    d = config.hidden_size // config.num_attention_heads  # head_dim
    q = config.num_attention_heads * d // world_size  # this rank's query features: whole heads
    kv = config.num_key_value_heads * d // world_size  # the KV heads those query heads read
    mlp = config.intermediate_size // world_size
    block = lambda n: (rank * n, (rank + 1) * n)  # the r-th contiguous block of n features
    return {
        "self_attn.q_proj": (0, *block(q)),  # column-parallel: rows (output features)
        "self_attn.k_proj": (0, *block(kv)),
        "self_attn.v_proj": (0, *block(kv)),
        "self_attn.o_proj": (1, *block(q)),  # row-parallel: columns (input features), then all-reduce
        "mlp.gate_proj": (0, *block(mlp)),
        "mlp.up_proj": (0, *block(mlp)),
        "mlp.down_proj": (1, *block(mlp)),
    }


def ring_bytes_per_token(hidden, layers, dtype_bytes, world_size):
    payload = 2 * layers * hidden * dtype_bytes  # two all-reduces per layer, one hidden vector each
    return 2 * (world_size - 1) / world_size * payload  # reduce-scatter + all-gather
