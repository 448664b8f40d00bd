"""Serving: a paged KV cache, its block manager, a continuous-batching engine, speculative decoding, and KV-cache
compression (int8/int4 with KIVI's scale layouts; StreamingLLM's sinks and window).

from labkit import models, serving
model, tok = models.load("smollm2-135m")
engine = serving.Engine(model, tok, num_blocks=256, block_size=16, max_batch=8)
for c in engine.generate(["The history of the city", "Once upon a time"], max_new_tokens=32):
    print(c.text)
serving.kv_memory_waste(serving.synthetic_request_lengths(), max_seq_len=2048, block_size=16)
result = serving.speculative_generate(model, draft, input_ids, max_new_tokens=64, k=4)  # a draft guesses, model checks
serving.perplexity_with_cache(model, test_ids, 1024, lambda: serving.QuantizedKVCache(model, bits=4))  # int4 KV cache
serving.Engine(model, tok, num_blocks=serving.blocks_for_budget(2**30, model.config, 16, kv_bits=8), kv_bits=8)
"""

from .block_manager import (
    BlockManager,
    NoFreeBlocksError,
    PagedKVCache,
    kv_bytes_per_token,
    kv_memory_waste,
    synthetic_request_lengths,
)
from .engine import Completion, Engine
from .kv_compression import (
    QuantizedKV,
    QuantizedKVCache,
    QuantizedPagedKVCache,
    StreamingCache,
    blocks_for_budget,
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
    rope_shift,
    unpack_codes,
)
from .speculative import SpeculativeResult, accept_tokens, expected_tokens_per_pass, speculative_generate
