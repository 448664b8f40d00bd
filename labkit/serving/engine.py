"""A small serving engine: continuous batching over a paged KV cache, greedy decoding.

    engine = Engine(model, tokenizer, num_blocks=256, block_size=16, max_batch=8)
    completions = engine.generate(["The capital of France", "def fib(n):"], max_new_tokens=32)

Each step of `generate`:
  1. admit waiting requests (first come, first served) while the batch has room and the pool has
     blocks for their tokens; prefill each: the decoder layers run by hand on its [1, n, hidden]
     prompt, the K/V of all n tokens go straight into its blocks, and attention over the prompt is
     FlashAttention (labkit.kernels.flash_attention, causal); its last logits give the first new token;
  2. decode one token for every running request at once: the same per-layer code on a
     [batch, 1, hidden] input, the new K/V go into each request's next slot, and attention reads the
     whole context through the block tables (labkit.kernels.paged_attention_decode);
  3. requests that hit max_new_tokens or EOS leave the batch and free their blocks at once, so
     waiting requests join at the next step (Orca's iteration-level scheduling, Yu et al. 2022).
When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks are freed and it is recomputed (re-prefilled) later, as in vLLM.

kv_bits=8 or 4 stores K/V quantized (QuantizedPagedKVCache: a scale and zero per token and KV head), so
the same memory holds about 1.9x or 3.5x the blocks (blocks_for_budget sizes the pool from a byte budget).

Greedy outputs equal `model.generate(ids, do_sample=False)` request by request (the tests check
this in fp32 on CPU with kv_bits=16; in fp16 on a GPU other kernels sum in other orders, and a near-tie
between two tokens can then go the other way; quantized K/V change the logits a little more).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..kernels import flash_attention, paged_attention_decode, rotary
from ..kernels.paged_attention import check_block_tables
from ..models import check_llama, head_dim
from .block_manager import BlockManager, PagedKVCache
from .kv_compression import QuantizedPagedKVCache, check_kv_bits


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens, EOS included when it ended the request
    text: str
    finish_reason: str  # "length" | "eos"


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        num_blocks: int,
        block_size: int = 16,
        max_batch: int = 8,
        backend: str = "auto",
        kv_bits: int = 16,
    ):
        """model: a Llama LlamaForCausalLM (labkit.models.load); tokenizer: its tokenizer.
        num_blocks, block_size: the KV pool (num_blocks · block_size tokens in all; blocks_for_budget
        gives num_blocks for a memory budget). max_batch: most requests decoded together. backend: for
        the attention and rotary kernels. kv_bits: 16 (K/V in the model's dtype), 8 or 4 (quantized)."""
        check_kv_bits(kv_bits)
        check_llama(model, "labkit.serving.Engine")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.block_size, self.max_batch, self.backend, self.kv_bits = block_size, max_batch, backend, kv_bits
        self.blocks = BlockManager(num_blocks, block_size)
        if kv_bits == 16:
            self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        else:
            self.cache = QuantizedPagedKVCache.for_model(model, num_blocks, block_size, kv_bits)
        c = model.config
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = head_dim(c)
        self.device = next(model.parameters()).device
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = c.eos_token_id if eos is None else eos
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.stats: dict = {}

    # --- the scheduler ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int | list[int] = 32) -> list[Completion]:
        """Greedy completions of `prompts` (strings or lists of token ids), in the prompts' order.

        max_new_tokens: one limit for all, or one per prompt (requests then leave the batch at
        different steps and waiting ones take their place). Statistics of the run: self.stats (decode
        steps, batch sizes, prefills, preemptions, seconds of prefill and decode, new tokens and
        tokens_per_s = new tokens / (prefill + decode seconds)). The model's own layers run, so a
        compressed model (quant.w8a8, quant.to_cpu_kernels, ...) is served as it is."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts) or min(limits, default=1) < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1 or one such int per prompt; got {max_new_tokens}.")
        requests = [_Request(i, self._encode(p), n) for i, (p, n) in enumerate(zip(prompts, limits))]
        for r in requests:
            # The last new token is never written to the cache: a request needs room for the rest.
            need = self.blocks.blocks_needed(len(r.prompt_ids) + r.max_new_tokens - 1)
            if need > self.blocks.num_blocks:
                raise ValueError(
                    f"request {r.id} ({len(r.prompt_ids)} prompt tokens + {r.max_new_tokens} new) "
                    f"needs {need} blocks of {self.block_size} tokens; the pool has "
                    f"{self.blocks.num_blocks}."
                )
        self.blocks = BlockManager(self.blocks.num_blocks, self.block_size)  # a clean pool for each call
        waiting, running = deque(requests), []
        stats = {"steps": 0, "batch_sizes": [], "prefills": 0, "preemptions": 0, "decode_s": 0.0, "prefill_s": 0.0}
        while waiting or running:
            # 1. admit and prefill
            while waiting and len(running) < self.max_batch and self._fits(waiting[0], len(running)):
                r = waiting.popleft()
                start = time.perf_counter()
                self._prefill(r)
                stats["prefill_s"] += time.perf_counter() - start
                stats["prefills"] += 1
                (running.append(r) if r.finish_reason is None else self.blocks.free(r.id))
            # 2. every running request needs a slot for its next token; if the pool cannot give all
            #    of them a block, preempt the most recently admitted (recomputed when readmitted)
            while sum(self.blocks.needs_block(r.id) for r in running) > self.blocks.num_free:
                victim = running.pop()
                self.blocks.free(victim.id)
                waiting.appendleft(victim)
                stats["preemptions"] += 1
            if not running:
                if waiting and self.blocks.num_free == self.blocks.num_blocks:
                    raise RuntimeError(
                        f"request {waiting[0].id} does not fit in an empty pool (a bug: sizes were checked above)."
                    )
                continue
            # 3. one decode step for the whole batch
            start = time.perf_counter()
            self._decode_step(running)
            stats["decode_s"] += time.perf_counter() - start
            stats["steps"] += 1
            stats["batch_sizes"].append(len(running))
            for r in [r for r in running if r.finish_reason is not None]:
                running.remove(r)
                self.blocks.free(r.id)
        stats["new_tokens"] = sum(len(r.output_ids) for r in requests)
        stats["tokens_per_s"] = stats["new_tokens"] / max(stats["prefill_s"] + stats["decode_s"], 1e-9)
        self.stats = stats
        return [
            Completion(r.prompt_ids, r.output_ids, self.tokenizer.decode(r.output_ids), r.finish_reason)
            for r in requests
        ]

    def _fits(self, r: _Request, n_running: int) -> bool:
        """Admit r if its tokens fit and one block per running request stays free for their next
        decode step (a watermark, so that a new request does not force an immediate preemption)."""
        need = self.blocks.blocks_needed(len(r.prompt_ids) + len(r.output_ids))
        return need + n_running <= self.blocks.num_free

    def _encode(self, prompt) -> list[int]:
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: the engine needs at least one prompt token.")
        return ids

    def _emit(self, r: _Request, token: int) -> None:
        r.output_ids.append(token)
        if token in self.eos_ids:
            r.finish_reason = "eos"
        elif len(r.output_ids) >= r.max_new_tokens:
            r.finish_reason = "length"

    # --- prefill: the whole prompt at once, FlashAttention over it ---------------------------------
    def _prefill(self, r: _Request) -> None:
        ids = r.prompt_ids + r.output_ids  # after a preemption, recompute the generated tokens too
        n = len(ids)
        self.blocks.allocate(r.id, n)
        slots = torch.tensor([self.blocks.slot(r.id, t) for t in range(n)], device=self.device)  # [n]

        def attend(i, q, k, v, scale):  # the prompt attends to itself: its K/V, fresh, not read back
            return flash_attention(q, k, v, causal=True, scale=scale, backend=self.backend)

        tokens = torch.tensor([ids], device=self.device)  # [1, n]
        logits = self._forward(tokens, torch.arange(n, device=self.device)[None], slots, attend)
        self._emit(r, int(logits[0].float().argmax()))

    # --- decode: one token for every running request -----------------------------------------------
    def _decode_step(self, running: list[_Request]) -> None:
        slots, positions = [], []
        for r in running:
            positions.append(self.blocks.num_tokens(r.id))  # the new token's position
            slot, copy = self.blocks.append_slot(r.id)
            if copy is not None:
                self.cache.copy_block(*copy)
            slots.append(slot)
        tables = [self.blocks.block_table(r.id) for r in running]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        context_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32)  # [B]
        # The kernel trusts these values for its addresses: check them here, once per step and on the
        # CPU, rather than in every layer's attention call on the device (a GPU sync per check).
        check_block_tables(block_tables, context_lens, self.blocks.num_blocks, self.block_size)
        used = None
        if self.kv_bits != 16:
            # The paged kernels (Triton and torch) read fp K/V only: dequantize the blocks this step
            # uses (in torch) into a small pool, and renumber the block tables into it.
            used = block_tables.unique()  # [m] sorted physical blocks
            block_tables = torch.searchsorted(used, block_tables).to(torch.int32)
            used = used.to(self.device)
        block_tables, context_lens = block_tables.to(self.device), context_lens.to(self.device)  # [B, width], [B]

        def attend(i, q, k, v, scale):  # q: [B, heads, 1, head_dim]; k, v: already in the cache
            pools = (self.cache.k[i], self.cache.v[i]) if used is None else self.cache.read(i, used)
            o = paged_attention_decode(
                q[:, :, 0].contiguous(),
                *pools,
                block_tables,
                context_lens,
                scale=scale,
                backend=self.backend,
                check_values=False,  # checked above, once per step
            )  # [B, heads, head_dim]
            return o[:, :, None]

        tokens = torch.tensor([[r.output_ids[-1]] for r in running], device=self.device)  # [B, 1]
        positions = torch.tensor(positions, device=self.device)[:, None]  # [B, 1]
        logits = self._forward(tokens, positions, torch.tensor(slots, device=self.device), attend)
        for r, token in zip(running, logits.float().argmax(-1).tolist()):
            self._emit(r, token)

    # --- the decoder layers, run by hand (prefill and decode) -----------------------------------------
    def _forward(self, tokens, positions, slots, attend) -> torch.Tensor:
        """The model on tokens [B, n] at positions [B, n]; the K/V of all B · n tokens are written to
        slots [B · n] (row-major) before attend(layer, q, k, v, scale) -> [B, heads, n, head_dim] runs,
        q [B, heads, n, head_dim] and k, v [B, kv_heads, n, head_dim] after rotary. Returns the last
        position's logits [B, vocab]."""
        model, (B, n) = self.model, tokens.shape
        h = model.model.embed_tokens(tokens)  # [B, n, hidden]
        cos, sin = model.model.rotary_emb(h, positions)  # [B, n, head_dim]
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, n, head_dim]
            k = attn.k_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(B, n, self.num_kv_heads, self.head_dim)  # [B, n, kv_heads, head_dim]
            q = rotary(q.contiguous(), cos, sin, backend=self.backend)
            k = rotary(k.contiguous(), cos, sin, backend=self.backend)  # [B, kv_heads, n, head_dim]
            self.cache.write(i, slots, k.transpose(1, 2).flatten(0, 1), v.flatten(0, 1))
            o = attend(i, q, k, v.transpose(1, 2).contiguous(), attn.scaling)  # [B, heads, n, head_dim]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, n, self.num_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(model.model.norm(h[:, -1:]))[:, -1]  # the last position only, as generate does
