"""Serving: a paged KV cache, its block manager, and a continuous-batching engine.

from labkit import models, serving
model, tok = models.load("smollm2-135m")
engine = serving.Engine(model, tok, num_blocks=256, block_size=16, max_batch=8)
for c in engine.generate(["The history of the city", "Once upon a time"], max_new_tokens=32):
    print(c.text)
serving.kv_memory_waste(serving.synthetic_request_lengths(), max_seq_len=2048, block_size=16)
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
