"""KV-cache compression: quantized K/V (KIVI) and attention sinks plus a sliding window (StreamingLLM).

    q = quantize_kv(k, bits=4, axis="channel", group_size=32)  # keys per channel, values axis="token"
    dequantize_kv(q), kv_bytes(q)
    perplexity_with_cache(model, tokens, 1024, lambda: QuantizedKVCache(model, bits=4), max_windows=4)
    perplexity_with_cache(model, tokens, 1024, lambda: StreamingCache(model, sinks=4, window=256))
    bytes_per_token(config, bits=4, group_size=128) vs bytes_per_token(config)  # fp16
    QuantizedPagedKVCache(...)  # the serving engine's paged pool in int8/int4 (Engine(kv_bits=8))
    blocks_for_budget(2**30, config, block_size=16, kv_bits=4)  # blocks that 1 GiB of KV holds

KIVI (Liu et al. 2024): keys have a few outlier channels, so keys are quantized per channel (a scale and
zero point per channel, from the statistics of a group of tokens); values have no such channels and are
quantized per token (per group of channels). Asymmetric: s = (max − min) / (2^b − 1), z = min,
Q = round((X − z) / s), X̂ = Q·s + z, so |X − X̂| <= s/2. The newest tokens stay in full precision (the residual).
StreamingLLM (Xiao et al. 2024): the first tokens absorb much of the attention ("attention sinks"); keeping
the first `sinks` tokens and the last `window` tokens lets a model run past its trained length.

Both caches are transformers `Cache`s (one layer object per decoder layer): attention calls layer.update(new
K/V) and reads what it returns; these layers return the past as they store it (dequantized or evicted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..evaluate import split_windows
from ..models import cache_kwarg, head_dim
from .block_manager import kv_bytes_per_token, pool_arguments

BITS = (2, 4, 8)
AXES = ("channel", "token")  # channel: statistics over tokens (keys); token: statistics over channels (values)


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: need an integer >= {minimum}.")


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits={bits!r}: allowed values are {', '.join(map(str, BITS))}.")


# --- quantize / dequantize ------------------------------------------------------------------------------


@dataclass
class QuantizedKV:
    """x [batch, kv_heads, seq, head_dim] quantized. codes: uint8 [batch, kv_heads, seq, head_dim · bits / 8],
    8 / bits codes a byte (the first in the low bits). scales, zeros (each group's minimum, a float offset as in
    KIVI): [batch, kv_heads, seq / group, head_dim] for axis "channel", [batch, kv_heads, seq, head_dim / group]
    for axis "token"."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple  # of x
    bits: int
    axis: str


def pack_codes(c: torch.Tensor, bits: int) -> torch.Tensor:
    """c: uint8 [..., n], values < 2^bits -> [..., n · bits / 8]; code i of a byte sits at bits i·b .. i·b + b − 1."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=c.device)  # [8 / bits]
    return (c.unflatten(-1, (-1, len(shifts))) << shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: sum = or


def unpack_codes(p: torch.Tensor, bits: int) -> torch.Tensor:
    """p: uint8 [..., m] -> codes [..., m · 8 / bits] (the inverse of pack_codes)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    return ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def quantize_kv(x: torch.Tensor, bits: int, axis: str, group_size: int | None = None) -> QuantizedKV:
    """x: [batch, kv_heads, seq, head_dim] -> QuantizedKV, asymmetric round-to-nearest.

    axis="channel" (keys): a scale/zero per channel per group of `group_size` tokens (None: all seq tokens).
    axis="token" (values): a scale/zero per token per group of `group_size` channels (None: all head_dim).
    Scales and zeros keep x's dtype."""
    _check_bits(bits)
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}: allowed values are {', '.join(map(repr, AXES))}.")
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, kv_heads, seq, head_dim]; got shape {list(x.shape)}.")
    dim = -2 if axis == "channel" else -1  # the axis the statistics run over
    n = x.shape[dim]
    g = n if group_size is None else group_size
    _check_int(g, "group_size", 1)
    if n % g or x.shape[-1] % (8 // bits):
        raise ValueError(
            f"group_size={g} must divide the {'seq' if dim == -2 else 'head_dim'} length {n}, and "
            f"head_dim={x.shape[-1]} must be a multiple of {8 // bits} (codes packed a byte at a time)."
        )
    levels = 2**bits - 1
    xg = x.float().unflatten(dim, (n // g, g))  # channel: [b, h, seq/g, g, d]; token: [b, h, seq, d/g, g]
    lo, hi = xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True)
    scale, zero = ((hi - lo) / levels).to(x.dtype), lo.to(x.dtype)  # s = (max − min) / (2^b − 1), z = min
    s = scale.float()
    q = torch.round((xg - zero.float()) / torch.where(s > 0, s, 1)).clamp(0, levels)  # Q = round((X − z) / s)
    codes = pack_codes(q.to(torch.uint8).flatten(dim - 1, dim), bits)
    return QuantizedKV(codes, scale.squeeze(dim), zero.squeeze(dim), tuple(x.shape), bits, axis)


def dequantize_kv(q: QuantizedKV) -> torch.Tensor:
    """QuantizedKV -> x̂ = Q·s + z: [batch, kv_heads, seq, head_dim] in the scales' dtype."""
    dim = -2 if q.axis == "channel" else -1
    codes = unpack_codes(q.codes, q.bits).float().unflatten(dim, (q.scales.shape[dim], -1))
    x = codes * q.scales.float().unsqueeze(dim) + q.zeros.float().unsqueeze(dim)
    return x.flatten(dim - 1, dim).to(q.scales.dtype)


def kv_bytes(q: QuantizedKV) -> int:
    """Stored bytes: packed codes + scales + zeros."""
    return sum(t.numel() * t.element_size() for t in (q.codes, q.scales, q.zeros))


def _append(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    """a then b along seq (codes, scales and zeros all have seq, or its groups, on dim −2)."""
    if a is None:
        return b
    cat = [torch.cat([s, t], -2) for s, t in ((a.codes, b.codes), (a.scales, b.scales), (a.zeros, b.zeros))]
    return QuantizedKV(*cat, (*a.shape[:2], a.shape[2] + b.shape[2], a.shape[3]), a.bits, a.axis)


# --- KIVI cache -----------------------------------------------------------------------------------------


class _QuantizedLayer(DynamicLayer):
    """Old tokens quantized (self.qk keys per channel, self.qv values per token); self.keys / self.values hold the
    full-precision residual [batch, kv_heads, r, head_dim]."""

    is_croppable = False

    def __init__(self, bits: int, group_size: int, residual: int):
        super().__init__()
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.qk = self.qv = None

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: [batch, kv_heads, new, head_dim]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        past_k = [] if self.qk is None else [dequantize_kv(self.qk)]
        past_v = [] if self.qv is None else [dequantize_kv(self.qv)]
        out = torch.cat([*past_k, self.keys], -2), torch.cat([*past_v, self.values], -2)
        # Quantize the oldest whole groups of group_size tokens, keeping >= residual tokens in full precision.
        n = max(self.keys.shape[-2] - self.residual, 0) // self.group_size * self.group_size
        if n:
            self.qk = _append(self.qk, quantize_kv(self.keys[..., :n, :], self.bits, "channel", self.group_size))
            self.qv = _append(self.qv, quantize_kv(self.values[..., :n, :], self.bits, "token", self.group_size))
            self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        return out

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("QuantizedKVCache does not reorder its quantized past (no beam search).")

    def get_seq_length(self) -> int:
        quantized = 0 if self.qk is None else self.qk.shape[2]
        return quantized + (self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0)

    def nbytes(self) -> int:
        quantized = sum(kv_bytes(q) for q in (self.qk, self.qv) if q is not None)
        fp = self.keys.numel() * self.keys.element_size() * 2 if self.is_initialized else 0
        return quantized + fp


class QuantizedKVCache(Cache):
    """KIVI's cache: keys quantized per channel over groups of `group_size` tokens, values per token over groups
    of `group_size` channels, with `bits` in (2, 4, 8).

    Residual: new tokens enter in full precision; after each update the oldest whole groups of group_size tokens
    are quantized, so the newest residual .. residual + group_size − 1 tokens stay in full precision (fewer at
    the start). A forward pass reads its own new tokens in full precision (as in prefill) and every earlier
    token as stored: dequantized, unless still in the residual. residual=0 quantizes all but a last partial group."""

    def __init__(self, model, bits: int = 4, group_size: int = 32, residual: int = 32):
        _check_bits(bits)
        _check_int(group_size, "group_size", 1)
        _check_int(residual, "residual", 0)
        dim = head_dim(model.config)
        if dim % group_size or dim % (8 // bits):
            raise ValueError(f"group_size={group_size} must divide head_dim={dim} (values group channels).")
        n = model.config.num_hidden_layers
        super().__init__(layers=[_QuantizedLayer(bits, group_size, residual) for _ in range(n)])

    def nbytes(self) -> int:
        """Bytes stored: quantized codes, scales and zeros, plus the full-precision residual."""
        return sum(layer.nbytes() for layer in self.layers)


# --- StreamingLLM cache ---------------------------------------------------------------------------------


def rope_shift(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys carrying RoPE at position p -> the same keys at position p + delta (RoPE is a rotation:
    R(p+δ) = R(δ)·R(p)). k: [..., head_dim], channels i and i + head_dim/2 rotate together by angle δ·θ_i;
    inv_freq: [head_dim / 2], the θ_i of model.model.rotary_emb."""
    angle = delta * inv_freq.float().to(k.device)  # [head_dim / 2]
    cos, sin = angle.cos().repeat(2), angle.sin().repeat(2)  # [head_dim]
    x1, x2 = k.float().chunk(2, -1)
    return (k.float() * cos + torch.cat([-x2, x1], -1) * sin).to(k.dtype)  # k·cos + rotate_half(k)·sin


def evict(keys, values, sinks: int, window: int, inv_freq):
    """Keep the first `sinks` and the last `window` tokens of keys, values [batch, kv_heads, n, head_dim].

    The keys carry RoPE at their cache positions 0..n−1; the kept window moves down by the number evicted
    (re-rotated, rope_shift), so the result again holds positions 0..len−1: StreamingLLM's positions within
    the cache. Returns (keys, values), unchanged when n <= sinks + window."""
    evicted = keys.shape[-2] - sinks - window
    if evicted <= 0:
        return keys, values
    kept_k = rope_shift(keys[..., sinks + evicted :, :], -evicted, inv_freq)
    keys = torch.cat([keys[..., :sinks, :], kept_k], -2)
    values = torch.cat([values[..., :sinks, :], values[..., sinks + evicted :, :]], -2)
    return keys, values


class _SinkLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, sinks: int, window: int, inv_freq: torch.Tensor):
        super().__init__()
        self.sinks, self.window, self.inv_freq = sinks, window, inv_freq

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)  # the past and the new tokens: what attention reads
        self.keys, self.values = evict(keys, values, self.sinks, self.window, self.inv_freq)
        return keys, values


class StreamingCache(Cache):
    """StreamingLLM: after each forward pass the cache keeps the first `sinks` and the last `window` tokens.

    Positions: within the cache, as in the paper. get_seq_length() is the number of tokens kept, so the model's
    default position_ids put new tokens right after them, and evict re-rotates the kept keys to consecutive
    positions (position_ids must not be passed). Eviction happens after attention: the tokens of one forward
    pass read up to sinks + window past tokens plus each other (with one token a pass: exactly the paper).
    Each eviction re-rotates the window's keys in fp32, so rounding errors accumulate slowly over a long stream."""

    def __init__(self, model, sinks: int = 4, window: int = 256):
        _check_int(sinks, "sinks", 0)
        _check_int(window, "window", 1)
        inv_freq = model.model.rotary_emb.inv_freq
        super().__init__(layers=[_SinkLayer(sinks, window, inv_freq) for _ in range(model.config.num_hidden_layers)])


# --- a quantized paged pool (the serving engine's kv_bits=8 / 4) --------------------------------------------


class QuantizedPagedKVCache:
    """PagedKVCache's interface (write, copy_block, nbytes) with K and V stored as `bits`-bit codes.

    Each token's K and V are quantized per KV head (quantize_kv's axis="token", one group of head_dim):
    a scale and a zero point in fp16 per token and head. KIVI quantizes keys per channel, but that needs
    the statistics of a group of tokens, and a paged slot is written one token at a time. Per layer:
        k[layer], v[layer]: QuantizedKV over the flat slots: codes [num_blocks · block_size, kv_heads, 1,
        head_dim · bits / 8] uint8, scales and zeros [num_blocks · block_size, kv_heads, 1, 1] fp16
    K/V are rounded to fp16 before quantizing; read() returns them in `dtype`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 8,
        dtype=torch.float32,
        device="cpu",
    ):
        _check_bits(bits)
        if head_dim % (8 // bits):
            raise ValueError(f"head_dim={head_dim} must be a multiple of {8 // bits} for bits={bits}.")
        slots = num_blocks * block_size

        def pool() -> QuantizedKV:
            codes = torch.zeros(slots, num_kv_heads, 1, head_dim * bits // 8, dtype=torch.uint8, device=device)
            scales = torch.zeros(slots, num_kv_heads, 1, 1, dtype=torch.float16, device=device)
            return QuantizedKV(codes, scales, scales.clone(), (slots, num_kv_heads, 1, head_dim), bits, "token")

        self.k = [pool() for _ in range(num_layers)]
        self.v = [pool() for _ in range(num_layers)]
        self.block_size, self.bits, self.dtype = block_size, bits, dtype

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, bits: int = 8) -> QuantizedPagedKVCache:
        return cls(num_blocks=num_blocks, block_size=block_size, bits=bits, **pool_arguments(model))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store K/V of some tokens. slots: [n_tokens]; k, v: [n_tokens, num_kv_heads, head_dim]."""
        for pool, x in ((self.k[layer], k), (self.v[layer], v)):
            q = quantize_kv(x.to(torch.float16)[:, :, None], self.bits, "token")  # [n, kv_heads, 1, head_dim]
            for t, new in zip((pool.codes, pool.scales, pool.zeros), (q.codes, q.scales, q.zeros)):
                t[slots] = new

    def read(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of some blocks. blocks: [m] block numbers -> k, v [m, block_size, num_kv_heads,
        head_dim] in self.dtype: a pool for paged attention whose block i is blocks[i]."""
        slots = (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)).flatten()
        out = []
        for pool in (self.k[layer], self.v[layer]):
            shape = (len(slots), *pool.shape[1:])
            q = QuantizedKV(pool.codes[slots], pool.scales[slots], pool.zeros[slots], shape, pool.bits, pool.axis)
            x = dequantize_kv(q)  # [m · block_size, kv_heads, 1, head_dim]
            out.append(x.view(len(blocks), self.block_size, x.shape[1], x.shape[3]).to(self.dtype))
        return out[0], out[1]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: duplicate block src into dst in every layer."""
        b = self.block_size
        for pool in (*self.k, *self.v):
            for t in (pool.codes, pool.scales, pool.zeros):
                t[dst * b : (dst + 1) * b] = t[src * b : (src + 1) * b]

    def nbytes(self) -> int:
        """Bytes stored: codes, scales and zeros of every slot."""
        return sum(kv_bytes(q) for q in (*self.k, *self.v))


KV_BITS = (16, 8, 4)  # a paged pool's K/V: 16 in the model's dtype (PagedKVCache); 8, 4: QuantizedPagedKVCache


def check_kv_bits(kv_bits) -> None:
    if isinstance(kv_bits, bool) or kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits={kv_bits!r}: allowed values are {', '.join(map(str, KV_BITS))}.")


def blocks_for_budget(budget_bytes: int, config, block_size: int = 16, kv_bits: int = 16) -> int:
    """How many KV blocks of block_size tokens fit in budget_bytes (a model config: layers, KV heads, head_dim).

    kv_bits=16: an fp16/bf16 PagedKVCache; 8 or 4: a QuantizedPagedKVCache (codes plus an fp16 scale and zero
    per token and KV head, i.e. bytes_per_token with group_size=head_dim). The same budget holds
    (2 · head_dim) / (head_dim · bits / 8 + 4) times the fp16 blocks: 1.94x for int8, 3.76x for int4 at head_dim 128."""
    check_kv_bits(kv_bits)
    _check_int(block_size, "block_size", 1)
    _check_int(budget_bytes, "budget_bytes", 0)
    per_token = bytes_per_token(config, kv_bits, group_size=head_dim(config), scale_bytes=2)
    return int(budget_bytes // (per_token * block_size))


# --- running a model with a cache -----------------------------------------------------------------------


@torch.no_grad()
def chunked_logits(model, input_ids: torch.Tensor, cache: Cache, chunk: int = 32) -> torch.Tensor:
    """input_ids: [batch, n] fed `chunk` tokens per forward pass through `cache` -> logits [batch, n, vocab].
    Each token reads its own chunk in full precision and all earlier tokens through the cache; chunk=1 is
    token-by-token decoding."""
    _check_int(chunk, "chunk", 1)
    name, n = cache_kwarg(model), input_ids.shape[1]
    logits = [model(input_ids[:, i : i + chunk], use_cache=True, **{name: cache}).logits for i in range(0, n, chunk)]
    return torch.cat(logits, 1)  # [batch, n, vocab]


@torch.no_grad()
def perplexity_with_cache(
    model, token_ids: torch.Tensor, seqlen: int, new_cache=None, chunk: int = 32, max_windows: int | None = None
) -> float:
    """evaluate.perplexity's protocol (the same non-overlapping windows; ppl = exp(mean NLL of tokens 2..seqlen)),
    each window fed through a fresh cache new_cache() (e.g. lambda: QuantizedKVCache(model, bits=4); None: the
    uncompressed DynamicCache) `chunk` tokens at a time (chunked_logits), so attention reads the past as stored."""
    windows = split_windows(model, token_ids, seqlen, max_windows)  # [n_windows, seqlen]
    device = next(model.parameters()).device
    nll = 0.0
    for window in windows:
        ids = window[None].to(device)  # [1, seqlen]
        logits = chunked_logits(model, ids, new_cache() if new_cache else DynamicCache(), chunk)[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    return math.exp(nll / (windows.shape[0] * (seqlen - 1)))


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache: Cache) -> torch.Tensor:
    """input_ids: [batch, n] -> [batch, n + max_new_tokens]: the prompt in one forward pass, then one greedy token
    per pass, all through `cache` (no stop at EOS)."""
    _check_int(max_new_tokens, "max_new_tokens", 1)
    name, ids, new = cache_kwarg(model), input_ids, input_ids
    for _ in range(max_new_tokens):
        new = model(new, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)  # [batch, 1]
        ids = torch.cat([ids, new], 1)
    return ids


# --- memory ---------------------------------------------------------------------------------------------


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache holds now: QuantizedKVCache.nbytes() (codes, scales, zeros, residual), else every layer's
    keys and values as stored (DynamicCache; StreamingCache after its evictions)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.is_initialized
        for t in (layer.keys, layer.values)
    )


def bytes_per_token(config, bits: int = 16, group_size: int = 128, scale_bytes: int = 2) -> float:
    """KV bytes one token costs across all layers (a model config: layers, KV heads, head_dim).

    bits=16: the fp16 cache, 2 · layers · kv_heads · head_dim · 2. bits in (2, 4, 8): QuantizedKVCache in the
    long run, per layer and KV head
        keys:   head_dim · bits/8 + 2 · scale_bytes · head_dim / group_size  (scale, zero: a channel, group_size tokens)
        values: head_dim · bits/8 + 2 · scale_bytes · head_dim / group_size  (scale, zero: a token, group_size channels)
    The residual (the newest tokens, kept in full precision) is a fixed cost per sequence, left out here.
    scale_bytes: 2 for scales and zeros in fp16 (the cache keeps them in the model's dtype)."""
    if isinstance(bits, bool) or bits not in (*BITS, 16):
        raise ValueError(f"bits={bits!r}: allowed values are {', '.join(map(str, BITS))} and 16 (the fp16 cache).")
    if bits == 16:
        return float(kv_bytes_per_token(config, 2))
    _check_int(group_size, "group_size", 1)
    d = head_dim(config)
    per_head = 2 * (d * bits / 8 + 2 * scale_bytes * d / group_size)
    return config.num_hidden_layers * config.num_key_value_heads * per_head
