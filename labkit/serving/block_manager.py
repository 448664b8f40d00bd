"""Paged KV-cache bookkeeping (vLLM's PagedAttention, Kwon et al. 2023).

The KV cache is one pool of fixed-size blocks per layer; a sequence owns a list of blocks (its
block table), allocated one at a time as it grows. No sequence reserves memory it does not use yet,
so the only waste is the unfilled tail of each sequence's last block -- against a contiguous cache
that must reserve max_seq_len tokens per request up front (`kv_memory_waste` measures both).

    BlockManager   which physical blocks each sequence owns (plain Python: no tensors)
    PagedKVCache   the tensors: per layer, k and v pools [num_blocks, block_size, num_kv_heads, head_dim]
"""

from __future__ import annotations

import math

import torch

from ..models import head_dim


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block left (the engine preempts a request when it sees this)."""


class BlockManager:
    """Allocates fixed-size blocks to sequences; shared blocks are reference-counted (copy-on-write).

    Token t of a sequence lives in block block_table(seq)[t // block_size] at offset t % block_size,
    i.e. at slot block * block_size + t % block_size of the flattened pool.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1; got {num_blocks}, {block_size}.")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self._ref = [0] * num_blocks  # how many sequences hold each block
        self._tables: dict[object, list[int]] = {}  # seq_id -> physical blocks, in logical order
        self._lens: dict[object, int] = {}  # seq_id -> tokens stored

    # --- queries ------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_needed(n_tokens) <= self.num_free

    def can_append(self, seq_id) -> bool:
        """True if append_slot(seq_id) will not need a block the pool lacks."""
        return not self.needs_block(seq_id) or self.num_free > 0

    def needs_block(self, seq_id) -> bool:
        """True if the next append_slot(seq_id) takes a block from the pool (new or copy-on-write)."""
        table, n = self._table(seq_id), self._lens[seq_id]
        return n % self.block_size == 0 or self._ref[table[-1]] > 1

    def block_table(self, seq_id) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id) -> int:
        self._table(seq_id)
        return self._lens[seq_id]

    def slot(self, seq_id, position: int) -> int:
        """Flat slot index of token `position` of seq_id: block * block_size + position % block_size."""
        table = self._table(seq_id)
        if not 0 <= position < self._lens[seq_id]:
            raise IndexError(f"position {position} is outside sequence {seq_id!r} (0..{self._lens[seq_id] - 1}).")
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables

    # --- changes ------------------------------------------------------------------------------------
    def allocate(self, seq_id, n_tokens: int) -> list[int]:
        """Give seq_id enough blocks for n_tokens tokens; returns its block table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first.")
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0; got {n_tokens}.")
        needed = self.blocks_needed(n_tokens)
        if needed > self.num_free:
            raise NoFreeBlocksError(
                f"sequence {seq_id!r} needs {needed} blocks for {n_tokens} tokens; "
                f"{self.num_free} of {self.num_blocks} are free."
            )
        self._tables[seq_id] = [self._take() for _ in range(needed)]
        self._lens[seq_id] = n_tokens
        return self.block_table(seq_id)

    def append_slot(self, seq_id) -> tuple[int, tuple[int, int] | None]:
        """Make room for one more token of seq_id; returns (slot, copy).

        slot: the flat slot index where the new token's K/V go. A new block is taken when the last
        one is full. copy: None, or (src_block, dst_block) when the last block was shared with a
        fork and partly filled: copy-on-write gave this sequence its own copy, and the caller must
        copy the block's contents (PagedKVCache.copy_block) before writing the slot.
        """
        table = self._table(seq_id)
        copy = None
        if self.needs_block(seq_id):
            if not self._free:
                raise NoFreeBlocksError(
                    f"no free block for the next token of sequence {seq_id!r} ({self.num_blocks} blocks, all in use)."
                )
            if self._lens[seq_id] % self.block_size == 0:  # last block full (or none yet): a fresh one
                table.append(self._take())
            else:  # last block partly filled but shared: copy on write
                src = table[-1]
                table[-1] = self._take()
                self._release(src)
                copy = (src, table[-1])
        position = self._lens[seq_id]
        self._lens[seq_id] += 1
        return table[position // self.block_size] * self.block_size + position % self.block_size, copy

    def fork(self, parent_id, child_id) -> list[int]:
        """child shares all of parent's blocks (reference counts + 1), e.g. for parallel sampling or
        beam search from one prompt. Writes into a shared, partly filled block copy it first."""
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} already has blocks.")
        table = self._table(parent_id)
        for b in table:
            self._ref[b] += 1
        self._tables[child_id] = list(table)
        self._lens[child_id] = self._lens[parent_id]
        return self.block_table(child_id)

    def free(self, seq_id) -> None:
        """Release seq_id's blocks; a block returns to the pool when no sequence holds it."""
        for b in self._table(seq_id):
            self._release(b)
        del self._tables[seq_id], self._lens[seq_id]

    def check(self) -> None:
        """Assert the invariants: reference counts match the tables, no block is both free and held,
        no block appears twice in the free list or in one table, every block is accounted for."""
        counts = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"sequence {seq_id!r} holds a block twice: {table}"
            assert len(table) == self.blocks_needed(self._lens[seq_id]), f"sequence {seq_id!r}: table/length mismatch"
            for b in table:
                counts[b] += 1
        assert counts == self._ref, "reference counts do not match the block tables"
        assert len(set(self._free)) == len(self._free), "a block is in the free list twice"
        assert all(self._ref[b] == 0 for b in self._free), "a free block is still held by a sequence"
        assert len(self._free) + sum(r > 0 for r in self._ref) == self.num_blocks, "a block is lost"

    # --- internals ----------------------------------------------------------------------------------
    def _table(self, seq_id) -> list[int]:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}: allocate it first.")
        return self._tables[seq_id]

    def _take(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free.append(b)


def pool_arguments(model) -> dict:
    """What a paged K/V pool takes from a model: its layers, KV heads and head size, its weights' dtype and device."""
    c, p = model.config, next(model.parameters())
    return dict(
        num_layers=c.num_hidden_layers,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim(c),
        dtype=p.dtype,
        device=p.device,
    )


class PagedKVCache:
    """Per-layer K and V block pools, the tensors the BlockManager's block numbers index.

    k[layer], v[layer]: [num_blocks, block_size, num_kv_heads, head_dim]
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=torch.float32,
        device="cpu",
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        return cls(num_blocks=num_blocks, block_size=block_size, **pool_arguments(model))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of some tokens (vLLM's reshape_and_cache).

        slots: [n_tokens] flat slot indices (BlockManager.append_slot / .slot)
        k, v: [n_tokens, num_kv_heads, head_dim]
        """
        kc, vc = self.k[layer], self.v[layer]
        kc.view(-1, *kc.shape[2:])[slots] = k.to(kc.dtype)  # [num_blocks * block_size, kv_heads, head_dim]
        vc.view(-1, *vc.shape[2:])[slots] = v.to(vc.dtype)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: duplicate block src into dst in every layer."""
        for pool in (*self.k, *self.v):
            pool[dst].copy_(pool[src])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


# --- memory waste: contiguous preallocation vs paging --------------------------------------------------


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V of one token across all layers: 2 · layers · kv_heads · head_dim · bytes."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype_bytes


def synthetic_request_lengths(
    n: int = 1000, max_seq_len: int = 2048, median: int = 300, sigma: float = 0.9, seed: int = 0
) -> list[int]:
    """Total lengths (prompt + output tokens) of n requests: log-normal with the given median, clipped
    to [1, max_seq_len]. A synthetic stand-in for chat traffic (most requests short, a long tail),
    not measured data."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g)).round().clamp(1, max_seq_len)
    return [int(x) for x in lengths]


def kv_memory_waste(lengths, max_seq_len: int, block_size: int = 16, bytes_per_token: int = 1) -> dict:
    """KV memory reserved vs used for requests of the given total lengths.

    contiguous: each request reserves max_seq_len tokens up front (it cannot know its final length).
    paged: each request holds ceil(length / block_size) blocks; only its last block is partly empty
    (internal fragmentation < block_size tokens per request). Waste = 1 - used / reserved.
    Returns a dict of token counts, bytes (tokens · bytes_per_token) and the two waste fractions.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 1 or n > max_seq_len for n in lengths):
        raise ValueError(f"every length must lie in [1, max_seq_len={max_seq_len}].")
    used = sum(lengths)
    contiguous = len(lengths) * max_seq_len
    paged = sum(math.ceil(n / block_size) * block_size for n in lengths)
    return {
        "requests": len(lengths),
        "max_seq_len": max_seq_len,
        "block_size": block_size,
        "used_tokens": used,
        "contiguous_tokens": contiguous,
        "paged_tokens": paged,
        "used_bytes": used * bytes_per_token,
        "contiguous_bytes": contiguous * bytes_per_token,
        "paged_bytes": paged * bytes_per_token,
        "contiguous_waste": 1 - used / contiguous,
        "paged_waste": 1 - used / paged,
    }
