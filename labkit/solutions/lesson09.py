"""Worked solutions of lesson 09's exercises (see labkit.solutions)."""

from __future__ import annotations

import math

from ..kernels import paged_attention


def kv_bytes_per_token(config, dtype_bytes):
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes  # K and V


def slot(block_table, block_size, t):
    return block_table[t // block_size] * block_size + t % block_size  # physical block, then the offset


def paged_waste(lengths, block_size):
    reserved = sum(math.ceil(n / block_size) * block_size for n in lengths)  # whole blocks
    return 1 - sum(lengths) / reserved


# The online-softmax step's worked solution is labkit's own, which the paged-attention kernel calls for every
# tile (labkit.kernels.paged_attention.online_softmax_step, a @triton.jit function).
online_softmax_step = paged_attention.online_softmax_step
