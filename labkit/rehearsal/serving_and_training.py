"""Plans for lessons 07 (distillation), 09 (KV cache, paged attention, serving), 10 (fused ops, W4A16),
11 (parallelism and offloading) and 12 (capstone): what each lesson's GPU profile does today.

Each plan follows the lesson's code cells in order, keeps alive the models the lesson keeps alive
(a `copy.deepcopy` of a GPU model is a copy on the GPU), and calls labkit where the lesson does, with
`GPU` for the profile's "cuda". Loops over identical shapes run twice (perplexity windows, decoder
layers of a walk, training steps) and each plan says so in Report.notes. Where labkit cannot run on
fake tensors (Triton kernels; GPTQ's and SparseGPT's column loops, minutes per layer) the plan runs
the torch backend or plans.column_loop_stand_in, bounded by tests/test_rehearsal.py, and notes it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import distill, evaluate, prune, serving
from ..kernels import llama as fused_llama
from .harness import GPU, HOST, Rehearsal, llama_7b, llama_7b_config, profile, tokens
from .plans import PROMPT_TOKENS

SEQLEN, CALIB = 2048, 128  # the GPU profile's window and calibration samples
WINDOWS = 2  # perplexity windows rehearsed (the lessons: 40 or the whole test split, same shapes)
STEPS = 2  # training steps rehearsed (the lessons: 1000, same shapes)
MICRO = 2  # windows per forward/backward when training a student (lessons 07 and 12: 8 per step, accumulated)
ACCUM = 2  # micro-batches per step rehearsed (the lessons: 8 // MICRO = 4, same shapes; the peak is in the second)


def _train_on_fake_values(r: Rehearsal) -> None:
    """distill's loop checks the gradient norm (isfinite decomposes into ops answered False on fake tensors)."""
    r.assume("if not torch.isfinite(norm)", True)


def _ppl(model) -> None:
    evaluate.perplexity(model, tokens(1, WINDOWS * SEQLEN), SEQLEN, progress=False)


def _generate(r: Rehearsal, model) -> None:
    """evaluate.measure_generation's memory: a short greedy generate (2 tokens; the lesson: 128)."""
    r.assume("unfinished_sequences.max() == 0", lambda n: n % 2 == 1)
    model.generate(tokens(1, PROMPT_TOKENS, GPU), max_new_tokens=2, do_sample=False, pad_token_id=0)


def _deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model) as the rehearsal makes it: the same modules with new tensors of the same shapes on the
    same devices. A deep-copied fake tensor's views get storages of their own (a FakeTensorMode quirk), so each
    transposed weight that training saves for the backward pass would count as another copy of the weight (the
    whole student again); new empty tensors have none of that, and the values do not matter here."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        new = torch.empty_like(t)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(model, memo)


# --- lesson 07 -------------------------------------------------------------------------------------


def lesson07(r: Rehearsal, micro: int = MICRO) -> None:
    """Teacher LLaMA-7B; a 16-layer student (ShortGPT's block influence) trained by fine-tuning, distillation
    and block-wise distillation (cells 13-28). The GPU profile trains through rank-8 LoRA adapters
    (profiles.Profile.lora_rank: lora.adapters, merged afterwards), 8 windows per step in micro-batches of
    `micro` (gradient accumulation)."""
    from .. import lora

    rank = profile("gpu").lora_rank
    batch, seq, block_steps = 8, 512, STEPS  # the lesson's GPU sizes (1000 steps, 200 block steps)
    _train_on_fake_values(r)
    with r.phase("load"):
        teacher = llama_7b(GPU)
    train = tokens(STEPS * batch, seq)  # data.calibration: [windows, 512] on the host
    with r.phase("block influence"):
        prune.block_influence(teacher, train[:16])
    keep = list(range(0, 32, 2))  # 16 of 32 layers (which ones does not change the shapes)
    with r.phase("student"):
        student0 = _deepcopy(prune.drop_layers(teacher, keep))  # drop_layers deep-copies the teacher: see _deepcopy
        student0.model.embed_tokens.weight.requires_grad_(False)
        _ppl(teacher)
        _ppl(student0)
    sizes = dict(steps=STEPS, lr=5e-4, batch_size=micro, grad_accum=min(ACCUM, batch // micro), progress=False)
    with r.phase("fine-tune"), torch.enable_grad():
        student_ft = _deepcopy(student0)
        with lora.adapters(student_ft, rank):
            distill.finetune(student_ft, train, **sizes)
        with torch.no_grad():
            _ppl(student_ft)
    del student_ft
    with r.phase("distill"), torch.enable_grad():
        student_kd = _deepcopy(student0)
        with lora.adapters(student_kd, rank):
            distill.distill(student_kd, teacher, train, loss="forward_kl", temperature=1.0, **sizes)
        with torch.no_grad():
            _ppl(student_kd)
    with r.phase("block-wise"):
        states, layer_kwargs = distill.layer_states(teacher, train[: 4 * batch])
        with torch.enable_grad(), lora.adapters(student0.model.layers[0], rank):
            distill.blockwise_distill(
                student0.model.layers[0],
                None,
                states[0],
                steps=block_steps,
                lr=5e-4,
                batch_size=batch,
                layer_kwargs=layer_kwargs,
                targets=states[2],
                progress=False,
            )
        del states
        _ppl(student0)
    with r.phase("generation"):
        _generate(r, teacher)
        _generate(r, student_kd)
    r.note(
        f"{STEPS} training steps (lesson: 1000) of {min(ACCUM, batch // micro)} micro-batches of {micro} windows "
        f"(lesson: {batch // micro}), {block_steps} "
        f"block-wise steps on one of the replaced spans (lesson: 200 steps on each), {WINDOWS} perplexity windows "
        "(lesson: 40); measure_generation stood in by a 2-token generate of the teacher and the distilled student"
    )


# --- lesson 09 -------------------------------------------------------------------------------------


def lesson09(r: Rehearsal) -> None:
    """LLaMA-7B on the GPU; decode with and without the KV cache up to 2048 tokens (cell 7, whose last cache
    stays alive), the paged-attention benchmark's pools (cell 39) and the engine's block pool (cell 41)."""
    with r.phase("load"):
        model = llama_7b(GPU)
    context = tokens(1, 2100, GPU)
    with r.phase("decode timing"):
        cache = None
        for length in (1024, 2048):  # the lesson: 128, 512, 1024, 2048; the last two reach the peak
            prefix = context[:, :length]
            model(prefix, use_cache=False, logits_to_keep=1)
            cache = model(prefix[:, :-1], use_cache=True).cache  # the previous cache is still alive
            for i in range(3):
                token = context[:, length - 1 + i : length + i]
                model(token, cache=cache, use_cache=True, logits_to_keep=1)
    with r.phase("paged attention benchmark"):
        from ..kernels import paged_attention_decode_torch

        seqs, ctx, heads, d, bs = 32, 1024, 32, 128, 16
        n_blocks = seqs * ctx // bs
        k_pool = torch.randn(n_blocks, bs, heads, d, dtype=torch.float16, device=GPU)
        v_pool = torch.randn_like(k_pool)
        tables = torch.randperm(n_blocks, device=GPU).view(seqs, ctx // bs).to(torch.int32)
        lens = torch.full((seqs,), ctx, dtype=torch.int32, device=GPU)
        q = torch.randn(seqs, heads, d, dtype=torch.float16, device=GPU)
        paged_attention_decode_torch(q, k_pool, v_pool, tables, lens)
        del k_pool, v_pool, tables, lens, q
    with r.phase("engine"):
        pool = serving.PagedKVCache.for_model(model, num_blocks=16, block_size=16)  # the engine's pool
        ids = tokens(1, PROMPT_TOKENS, GPU)
        r.assume("unfinished_sequences.max() == 0", lambda n: n >= 1)
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        del pool
    r.note(
        "context lengths 1024 and 2048 timed (lesson: also 128, 512); the Triton kernel's benchmark runs the torch "
        "reference on the same pools (Triton cannot run on fake tensors); the engine (cell 41) is its KV pool "
        "(16 blocks of 16 tokens) and a 2-token generate, not serving.Engine itself (it needs the tokenizer)"
    )
    del cache


# --- lesson 10 -------------------------------------------------------------------------------------


def lesson10(r: Rehearsal) -> None:
    """LLaMA-7B on the GPU; layer 0's linears packed to W4A16 one by one (cell 20); the dense model's logits and
    a short generate; fuse(model, w4a16=True) in place; the fused model's logits (torch backend)."""
    with r.phase("load"):
        model = llama_7b(GPU)
    prompt = tokens(1, PROMPT_TOKENS, GPU)
    with r.phase("pack layer 0"):
        for linear in list(model.model.layers[0].mlp.children()) + list(model.model.layers[0].self_attn.children()):
            if isinstance(linear, torch.nn.Linear):
                packed = fused_llama.W4A16Linear.from_linear(linear, 128, False)
        del packed
    with r.phase("dense"):
        ref_logits = model(prompt).logits.float()
    with r.phase("fuse"):  # the replaced fp16 weights are parked in CPU memory (transform._parked: cpu:1)
        fused_llama.fuse(model, w4a16=True, group_size=128, float_offset=False, backend="torch")
    with r.phase("fused"):
        model(prompt).logits.float()  # the one-token timing forward is smaller
    with r.phase("bandwidth"):  # cells 24-26: kernels on LLaMA-7B-sized activations, seqlen rows
        x = torch.randn(SEQLEN, 11008, dtype=torch.float16, device=GPU)
        torch.nn.functional.silu(x) * x
        del x
    del ref_logits
    r.note(
        "fused kernels run on the torch backend (Triton cannot run on fake tensors; the Triton kernels allocate "
        "the same outputs); the bandwidth cells' tensors approximated by one [2048, 11008] fp16 activation; fuse's "
        "all_or_nothing parks the replaced fp16 weights in CPU memory as on CUDA (labkit.transform._parked patched "
        "for the stand-in GPU)"
    )


# --- lesson 11 -------------------------------------------------------------------------------------

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def lesson11(r: Rehearsal) -> None:
    """The GPU profile loads SmolLM2-135M, not LLaMA-7B (cell 2: DEMO = "smollm2-135m"): a fp32 copy on the
    host for the tensor/pipeline-parallel demonstrations (gloo, CPU ranks), a resident fp16 copy on the GPU and
    an offloaded one (cell 27), a 2048-token prefill (cell 30)."""
    from transformers import LlamaConfig

    with r.phase("load"):
        host_model = llama_7b(HOST, torch.float32, LlamaConfig(**SMOLLM2_135M, dtype=torch.float32))
        resident = llama_7b(GPU, torch.float16, LlamaConfig(**SMOLLM2_135M, dtype=torch.float16))
        offloaded_host = llama_7b(HOST, torch.float16, LlamaConfig(**SMOLLM2_135M, dtype=torch.float16))
    with r.phase("generate and prefill"):
        ids = tokens(1, PROMPT_TOKENS, GPU, vocab=SMOLLM2_135M["vocab_size"])
        r.assume("unfinished_sequences.max() == 0", lambda n: n >= 1)
        resident.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        resident(tokens(1, SEQLEN, GPU, vocab=SMOLLM2_135M["vocab_size"]), use_cache=False, logits_to_keep=1)
    r.note(
        "SmolLM2-135M only (LLaMA-7B is never loaded, checked in the notebook's code); the offloaded copy is "
        "counted on the host (its layers are fetched one at a time, 2 MiB each); gloo ranks are separate processes"
    )
    del host_model, offloaded_host


# --- lesson 12 -------------------------------------------------------------------------------------


def flap20_stand_in_config():
    """LLaMA-7B with a 30%-narrower MLP: ~80% of the decoder's parameters, what FLaP at 20% keeps (FLaP's
    own selection is data: tests bound the parameter ratio)."""
    config = llama_7b_config()
    config.intermediate_size = 11008 * 7 // 10
    return config


def lesson12(r: Rehearsal, micro: int = MICRO) -> None:
    """Capstone with one compressed 7B model alive at a time: cell 6 counts bytes on a meta copy; cell 15
    compresses `model` itself (SparseGPT 2:4, then GPTQ), the naive GPTQ tried inside transform.undone (no
    copy); cell 20 reloads the dense model as the teacher and trains a FLaP-20% copy through LoRA adapters,
    then frees the teacher; cell 24 reloads the two exports one at a time."""
    from .. import lora, models, quant, transform
    from .compression import column_loops, first_layers

    rank = profile("gpu").lora_rank
    _train_on_fake_values(r)
    with r.phase("load"):
        model = llama_7b(GPU)
    calib = tokens(CALIB, SEQLEN)
    with r.phase("cell 6: bytes of a meta copy"):
        evaluate.weight_bytes(models.meta_copy(model).to(torch.float16))  # half is fp16 on the GPU profile
    with r.phase("cell 8: perplexity"):
        _ppl(model)
    with r.phase("cell 15: SparseGPT 2:4 in place, naive GPTQ inside transform.undone"), first_layers(), column_loops():
        combo = model  # the lesson: combo = model; del model
        del model
        prune.sparsegpt(combo, calib, pattern="2:4")
        with transform.undone(combo):  # the replaced fp16 weights wait in CPU memory, then come back
            quant.gptq(combo, calib, 4, group_size=128, pack=False)
    with r.phase("cell 15: GPTQ keep_zeros, packed"):
        quant.rtn(combo, 4, 128)  # stands in for quant.gptq(combo, ..., keep_zeros=True): the same packed layout
    with r.phase("cell 17: perplexity, generation"):
        _ppl(combo)
        _generate(r, combo)
    with r.phase("cell 20: the teacher reloaded, FLaP on a copy"):
        model = llama_7b(GPU)  # models.load
        student = _deepcopy(model)
        with first_layers():
            prune.flap_stats(student, calib)  # prune.flap's walk
        del student
        student = llama_7b(GPU, config=flap20_stand_in_config())  # what FLaP keeps
        _ppl(student)
    with r.phase("cell 20: distillation through LoRA adapters"), torch.enable_grad():
        train = tokens(STEPS * 8, 512)
        with lora.adapters(student, rank):
            distill.distill(
                student,
                model,
                train,
                steps=STEPS,
                loss="forward_kl",
                temperature=1.0,
                lr=5e-5,
                batch_size=micro,
                grad_accum=min(ACCUM, 8 // micro),
                progress=False,
            )
    del model  # the lesson: del model, once the distillation is done
    with r.phase("cell 20: perplexity, generation"):
        _ppl(student)
        _generate(r, student)
    with r.phase("cell 24: the exports reloaded, one at a time"):
        ids = tokens(1, 64, GPU)
        reloaded = llama_7b(GPU)  # models.load, before quant.load_gptq packs it
        reloaded(ids).logits, combo(ids).logits
        del reloaded
        reloaded = llama_7b(GPU, config=flap20_stand_in_config())  # export.load_compressed
        reloaded(ids).logits, student(ids).logits
        del reloaded
    r.note(
        f"walks: SparseGPT and the naive GPTQ, 2 of 32 layers each (column loops: plans.column_loop_stand_in); "
        f"the keep_zeros GPTQ's walk has the naive one's shapes with one model fewer alive, so quant.rtn stands "
        f"in for its result (the same packed layout); {WINDOWS} perplexity windows; generation: 2 tokens"
    )
    r.note(
        f"FLaP: its walk (prune.flap_stats) on a full copy, its result stood in by a model with a 30%-narrower MLP "
        f"(~80% of the parameters); {STEPS} distillation steps (lesson: 1000) of {min(ACCUM, 8 // micro)} "
        f"micro-batches of {micro} windows (lesson: {8 // micro}); cell 24: each reload is a fresh model before "
        f"quant.load_gptq packs it (fp16, the larger) or the "
        f"pruned stand-in, the files themselves not read"
    )


PLANS = {"07": lesson07, "09": lesson09, "10": lesson10, "11": lesson11, "12": lesson12}
