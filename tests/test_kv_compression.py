"""labkit.serving.kv_compression: KIVI-style K/V quantization (round trip, packing, bytes), the quantized cache
inside a Llama forward (and proof that attention reads it), and StreamingLLM's sinks + window cache."""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from labkit import evaluate, models
from labkit.serving import kv_compression as kc
from labkit.serving.kv_compression import (
    QuantizedKVCache,
    StreamingCache,
    bytes_per_token,
    cache_nbytes,
    chunked_logits,
    dequantize_kv,
    evict,
    greedy_generate,
    kv_bytes,
    pack_codes,
    perplexity_with_cache,
    quantize_kv,
    unpack_codes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_7B = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)


def _expand(q, group):
    """Scales [.., seq/group, d] (channel) or [.., seq, d/group] (token) -> one per element of x."""
    return q.scales.repeat_interleave(group, dim=-2 if q.axis == "channel" else -1)


def _ids(n=64, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# --- quantize / dequantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize(("axis", "group"), [("channel", 8), ("channel", None), ("token", 4), ("token", None)])
def test_round_trip_error_at_most_half_a_step(bits, axis, group):
    x = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(bits)) * 3  # [batch, kv_heads, seq, head_dim]
    q = quantize_kv(x, bits, axis, group)
    g = group or (16 if axis == "channel" else 8)
    want = (2, 3, 16 // g, 8) if axis == "channel" else (2, 3, 16, 8 // g)  # per-channel vs per-token layouts
    assert q.scales.shape == q.zeros.shape == want
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 16, 8 * bits // 8)
    err = (dequantize_kv(q) - x).abs()
    assert (err <= _expand(q, g) / 2 + 1e-5).all()  # |X − X̂| <= s/2; 1e-5: fp32 rounding of (X − z)/s
    assert err.max() > 0


def test_constant_group_is_exact():
    x = torch.full((1, 1, 4, 8), 0.7)
    q = quantize_kv(x, 4, "channel")
    assert (q.scales == 0).all() and torch.equal(dequantize_kv(q), x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packing_is_exact(bits):
    c = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    p = pack_codes(c, bits)
    assert p.shape == (3, 5, 16 * bits // 8) and torch.equal(unpack_codes(p, bits), c)
    if bits == 4:  # two codes a byte, the first in the low nibble
        assert p[0, 0, 0] == c[0, 0, 0] + 16 * c[0, 0, 1]


def test_per_channel_keys_beat_per_token_with_an_outlier_channel():
    """KIVI's reason for the key layout: a channel of consistently large keys stretches every per-token range,
    while per channel its range is as small as the others'."""
    k = torch.randn(1, 2, 32, 16, generator=torch.Generator().manual_seed(0))
    k[..., 3] += 20
    per_channel = (dequantize_kv(quantize_kv(k, 4, "channel", 32)) - k).pow(2).mean()
    per_token = (dequantize_kv(quantize_kv(k, 4, "token")) - k).pow(2).mean()
    assert per_channel < per_token / 10


# --- bytes ----------------------------------------------------------------------------------------------


def test_kv_bytes_by_hand():
    x = torch.randn(1, 2, 64, 16)  # fp32
    # int4 per channel, groups of 32 tokens: codes 1·2·64·16/2 = 1024 B; scales and zeros 1·2·2·16 · 4 B = 256 B each
    assert kv_bytes(quantize_kv(x, 4, "channel", 32)) == 1024 + 256 + 256
    # int8 per token, groups of 8 channels: codes 2048 B; scales and zeros 1·2·64·2 · 4 B = 1024 B each
    assert kv_bytes(quantize_kv(x.half(), 8, "token", 8)) == 2048 + 512 + 512  # fp16 scales: 2 B each


def test_bytes_per_token_at_llama_7b():
    fp16 = bytes_per_token(LLAMA_7B)
    assert fp16 == 2 * 32 * 32 * 128 * 2  # 512 KiB a token
    # per layer and head, keys and values: 128 · bits/8 codes + 2 · 2 B · 128/128 for scale and zero
    assert bytes_per_token(LLAMA_7B, 8, group_size=128) == 32 * 32 * 2 * (128 + 4)
    assert bytes_per_token(LLAMA_7B, 4, group_size=128) == 32 * 32 * 2 * (64 + 4)
    int8 = fp16 / bytes_per_token(LLAMA_7B, 8, group_size=128)
    int4 = fp16 / bytes_per_token(LLAMA_7B, 4, group_size=128)
    # 8-bit codes are exactly half of fp16, so any scale/zero overhead keeps int8 below 2x: 2 / (1 + 4/128)
    assert 1.9 < int8 < 2 and int4 >= 3.5
    assert fp16 / bytes_per_token(LLAMA_7B, 4, group_size=32) < 3.5  # smaller groups cost more overhead


def test_cache_bytes_by_hand(tiny):
    cache = QuantizedKVCache(tiny, bits=4, group_size=8, residual=8)
    chunked_logits(tiny, _ids(40), cache, chunk=8)
    for layer in cache.layers:  # 40 tokens: 32 quantized (4 groups of 8), 8 in the residual
        assert layer.qk.shape[2] == 32 and layer.keys.shape[-2] == 8
    # per layer (batch 1, 2 KV heads, head_dim 16, fp32): keys 512 B codes + 2 · (2·4·16) · 4 B for scales and
    # zeros; values 512 + 2 · (2·32·2) · 4; residual 2 · (2·8·16) · 4 B
    per_layer = (512 + 512 + 512) + (512 + 512 + 512) + 2048
    assert cache.nbytes() == 2 * per_layer == cache_nbytes(cache)
    plain, window = DynamicCache(), StreamingCache(tiny, sinks=2, window=6)
    for c in (plain, window):
        chunked_logits(tiny, _ids(40), c, chunk=8)
    assert cache_nbytes(plain) == 2 * 2 * (2 * 40 * 16) * 4  # 2 layers x (K, V) x [1, 2, 40, 16] fp32
    assert cache_nbytes(window) == 2 * 2 * (2 * 8 * 16) * 4  # 2 sinks + 6 kept
    quantized = 2 * (512 + 512 + 512) * 2
    assert quantized / 32 == bytes_per_token(tiny.config, 4, group_size=8, scale_bytes=4)  # fp32 scales here


# --- the quantized cache inside the model -----------------------------------------------------------------


def test_chunked_uncompressed_equals_one_forward(tiny):
    ids = _ids()
    # 2e-6: the same sums in another order (one pass over 64 tokens vs 8 passes of 8)
    torch.testing.assert_close(chunked_logits(tiny, ids, DynamicCache(), 8), tiny(ids).logits, atol=2e-6, rtol=0)


def test_quantized_cache_error_grows_as_bits_shrink(tiny):
    ids = _ids()
    ref = tiny(ids).logits
    err = {}
    for bits in (8, 4, 2):
        logits = chunked_logits(tiny, ids, QuantizedKVCache(tiny, bits, group_size=8, residual=0), chunk=8)
        torch.testing.assert_close(logits[:, :8], ref[:, :8], atol=2e-6, rtol=0)  # the first chunk has no past
        err[bits] = (logits - ref).abs().max().item()
    assert 0 < err[8] < 0.01 * ref.abs().max() and err[8] < err[4] < err[2]


def test_residual_keeps_recent_tokens_in_full_precision(tiny):
    ids = _ids()
    ref = tiny(ids).logits
    all_fp = chunked_logits(tiny, ids, QuantizedKVCache(tiny, 2, group_size=8, residual=64), chunk=8)
    torch.testing.assert_close(all_fp, ref, atol=2e-6, rtol=0)  # nothing ever left the residual
    some_fp = chunked_logits(tiny, ids, QuantizedKVCache(tiny, 2, group_size=8, residual=32), chunk=8)
    none_fp = chunked_logits(tiny, ids, QuantizedKVCache(tiny, 2, group_size=8, residual=0), chunk=8)
    assert (some_fp - ref).abs().max() < (none_fp - ref).abs().max()


def test_attention_reads_the_quantized_cache(tiny, monkeypatch):
    """Break the dequantizer: if the forward did not read the stored past, the logits could not change."""
    ids = _ids()
    good = chunked_logits(tiny, ids, QuantizedKVCache(tiny, 8, group_size=8, residual=0), chunk=8)
    monkeypatch.setattr(kc, "dequantize_kv", lambda q: torch.zeros(q.shape))
    broken = chunked_logits(tiny, ids, QuantizedKVCache(tiny, 8, group_size=8, residual=0), chunk=8)
    assert torch.equal(broken[:, :8], good[:, :8])  # no past yet
    assert (broken[:, 8:] - good[:, 8:]).abs().amax(-1).min() > 10 * (good - tiny(ids).logits).abs().max()


def test_perplexity_with_cache(tiny):
    stream = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(2))
    fp = evaluate.perplexity(tiny, stream, 128, progress=False)
    assert perplexity_with_cache(tiny, stream, 128, chunk=16) == pytest.approx(fp, rel=1e-5)
    ppl = {b: perplexity_with_cache(tiny, stream, 128, lambda b=b: QuantizedKVCache(tiny, b, 8, 0), 16) for b in (8, 2)}
    assert abs(ppl[8] - fp) < abs(ppl[2] - fp)


# --- StreamingLLM ---------------------------------------------------------------------------------------


def test_cache_never_exceeds_sinks_plus_window(tiny):
    cache, name = StreamingCache(tiny, sinks=2, window=6), models.cache_kwarg(tiny)
    ids = _ids(20)
    for i in range(20):
        tiny(ids[:, i : i + 1], use_cache=True, **{name: cache})
        assert all(layer.keys.shape[-2] == min(i + 1, 8) for layer in cache.layers)
        assert cache.get_seq_length() == min(i + 1, 8)
    out = greedy_generate(tiny, ids[:, :5], 12, StreamingCache(tiny, sinks=2, window=6))
    assert out.shape == (1, 17)


def test_evict_keeps_sinks_and_window_at_positions_within_the_cache(tiny):
    k = torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(3))  # before RoPE
    v = torch.randn(1, 2, 12, 16)

    def rope(x, positions):  # the model's own rotary embedding
        cos, sin = tiny.model.rotary_emb(x, torch.tensor([positions]))
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    keys, values = evict(rope(k, list(range(12))), v, sinks=2, window=4, inv_freq=tiny.model.rotary_emb.inv_freq)
    kept = [0, 1, 8, 9, 10, 11]
    torch.testing.assert_close(values, v[:, :, kept])
    torch.testing.assert_close(keys, rope(k[:, :, kept], list(range(6))), atol=1e-5, rtol=0)  # re-rotated to 0..5
    same = evict(k, v, sinks=2, window=10, inv_freq=tiny.model.rotary_emb.inv_freq)
    assert same[0] is k and same[1] is v


def test_window_covering_the_sequence_changes_nothing(tiny):
    ids = _ids()
    ref = tiny(ids).logits
    torch.testing.assert_close(chunked_logits(tiny, ids, StreamingCache(tiny, 4, 60), 8), ref, atol=2e-6, rtol=0)
    small = chunked_logits(tiny, ids, StreamingCache(tiny, 4, 16), 8)
    assert (small[:, 28:] - ref[:, 28:]).abs().max() > 1e-3  # evicted: later tokens see less context
    prompt = ids[:, :8]
    naive = prompt  # greedy decoding recomputed from scratch each step: no cache at all
    for _ in range(10):
        naive = torch.cat([naive, tiny(naive).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy_generate(tiny, prompt, 10, StreamingCache(tiny, 4, 60)), naive)


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument(tiny):
    x = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"bits=3: allowed values are 2, 4, 8"):
        quantize_kv(x, 3, "channel")
    with pytest.raises(ValueError, match=r"bits=True"):
        quantize_kv(x, True, "channel")
    with pytest.raises(ValueError, match=r"axis='head': allowed values are 'channel', 'token'"):
        quantize_kv(x, 4, "head")
    with pytest.raises(ValueError, match=r"group_size=5 must divide the seq length 16"):
        quantize_kv(x, 4, "channel", 5)
    with pytest.raises(ValueError, match=r"group_size=0: need an integer >= 1"):
        quantize_kv(x, 4, "token", 0)
    with pytest.raises(ValueError, match=r"\[batch, kv_heads, seq, head_dim\]"):
        quantize_kv(x[0], 4, "token")
    with pytest.raises(ValueError, match=r"bits=16: allowed values are 2, 4, 8"):
        QuantizedKVCache(tiny, bits=16)
    with pytest.raises(ValueError, match=r"group_size=5 must divide head_dim=16"):
        QuantizedKVCache(tiny, bits=4, group_size=5)
    with pytest.raises(ValueError, match=r"residual=-1: need an integer >= 0"):
        QuantizedKVCache(tiny, residual=-1)
    with pytest.raises(ValueError, match=r"window=-1: need an integer >= 1"):
        StreamingCache(tiny, window=-1)
    with pytest.raises(ValueError, match=r"sinks=-2: need an integer >= 0"):
        StreamingCache(tiny, sinks=-2)
    with pytest.raises(ValueError, match=r"chunk=0: need an integer >= 1"):
        chunked_logits(tiny, _ids(8), DynamicCache(), chunk=0)
    with pytest.raises(ValueError, match=r"bits=3: allowed values are 2, 4, 8 and 16"):
        bytes_per_token(LLAMA_7B, 3)
