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

import contextlib
import copy

import torch

from .. import distill, evaluate, prune, serving, walk
from ..kernels import llama as fused_llama
from .harness import GPU, HOST, Rehearsal, llama_7b, llama_7b_config, tokens
from .plans import PROMPT_TOKENS, column_loop_stand_in

SEQLEN, CALIB = 2048, 128  # the GPU profile's window and calibration samples
WINDOWS = 2  # perplexity windows rehearsed (the lessons: 40 or the whole test split, same shapes)
STEPS = 2  # training steps rehearsed (the lessons: 1000, same shapes)


def _train_on_fake_values(r: Rehearsal) -> None:
    """distill's loop checks the gradient norm (isfinite decomposes into ops answered False on fake tensors)."""
    r.assume("if not torch.isfinite(norm)", True)


def _ppl(model) -> None:
    evaluate.perplexity(model, tokens(1, WINDOWS * SEQLEN), SEQLEN, progress=False)


# --- lesson 07 -------------------------------------------------------------------------------------


def lesson07(r: Rehearsal) -> None:
    """Teacher LLaMA-7B; a 16-layer student (ShortGPT's block influence) trained by fine-tuning, distillation
    and block-wise distillation with AdamW on fp32 master copies (cells 13-21)."""
    batch, seq, block_steps = 8, 512, STEPS  # the lesson's GPU sizes (1000 steps, 200 block steps)
    _train_on_fake_values(r)
    with r.phase("load"):
        teacher = llama_7b(GPU)
    train = tokens(STEPS * batch, seq)  # data.calibration: [windows, 512] on the host
    with r.phase("block influence"):
        prune.block_influence(teacher, train[:16])
    keep = list(range(0, 32, 2))  # 16 of 32 layers (which ones does not change the shapes)
    with r.phase("student"):
        student0 = prune.drop_layers(teacher, keep)
        student0.model.embed_tokens.weight.requires_grad_(False)
        _ppl(teacher)
        _ppl(student0)
    with r.phase("fine-tune"), torch.enable_grad():
        student_ft = copy.deepcopy(student0)
        distill.finetune(student_ft, train, steps=STEPS, lr=5e-4, batch_size=batch, progress=False)
    del student_ft
    with r.phase("distill"), torch.enable_grad():
        student_kd = copy.deepcopy(student0)
        distill.distill(
            student_kd,
            teacher,
            train,
            steps=STEPS,
            loss="forward_kl",
            temperature=1.0,
            lr=5e-4,
            batch_size=batch,
            progress=False,
        )
    with r.phase("block-wise"):
        states, layer_kwargs = distill.layer_states(teacher, train[: 4 * batch])
        with torch.enable_grad():
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
    r.note(
        f"{STEPS} training steps (lesson: 1000), {block_steps} block-wise steps on one of the replaced spans "
        f"(lesson: 200 steps on each), {WINDOWS} perplexity windows (lesson: 40) of the teacher and the untrained "
        "student; the trained students' perplexities (fewer models alive than in training) and measure_generation "
        "not rehearsed"
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


class _EnoughLayers(Exception):
    pass


def _walk(model, calibration, method: str, layers: int = 2) -> None:
    """labkit.walk.calibration_walk over the first `layers` layers with the method's update memory
    (plans.column_loop_stand_in), on a model that is already where the lesson has it."""
    sequential = walk.SEQUENTIAL_GROUPS if method == "gptq" else None
    groups = len(sequential) if sequential else 1
    done = {"updates": 0}

    def make_stats(name, linear):
        if done["updates"] == layers * groups:
            raise _EnoughLayers
        return walk.Hessian(linear.in_features, device=linear.weight.device)

    def update(index, layer, stats):
        for name, hessian in stats.items():
            column_loop_stand_in(layer.get_submodule(name).weight, hessian.H, method)
        done["updates"] += 1

    with contextlib.suppress(_EnoughLayers):
        walk.calibration_walk(model, calibration, make_stats, update, device=GPU, sequential=sequential, batch_size=8)


def _gpu_copy():
    """copy.deepcopy of a LLaMA-7B fp16 model on the GPU: a fresh one, the same bytes. (Deepcopied fake parameters
    are held by a MetaConverter's weak memo, so the walk's module.to() cannot swap them.)"""
    return llama_7b(GPU)


def flap20_stand_in_config():
    """LLaMA-7B with a 30%-narrower MLP: ~80% of the decoder's parameters, what FLaP at 20% keeps (FLaP's
    own selection, a walk over a full copy, is not rehearsed; tests bound the parameter ratio)."""
    config = llama_7b_config()
    config.intermediate_size = 11008 * 7 // 10
    return config


def lesson12(r: Rehearsal) -> None:
    """Capstone: SparseGPT 2:4 then GPTQ on a copy while a second copy takes the naive order (cell 15: three
    models), then a FLaP-20% copy distilled from the dense model with AdamW (cell 20) while the compressed copy
    is kept for the export."""
    _train_on_fake_values(r)
    with r.phase("load"):
        model = llama_7b(GPU)
    calib = tokens(CALIB, SEQLEN)
    with r.phase("fp16 copy"):  # cell 5: copy.deepcopy(model).to(half), deleted at once
        low = _gpu_copy()  # copy.deepcopy(model).to(half): half is fp16 on the GPU profile, the model's dtype
        del low
    _ppl(model)
    with r.phase("sparsegpt 2:4 + gptq"):
        combo = _gpu_copy()  # copy.deepcopy(model)
        _walk(combo, calib, "sparsegpt")
        naive = _gpu_copy()  # copy.deepcopy(combo)
        _walk(naive, calib, "gptq")  # combo's GPTQ walk follows with the same three models and shapes
        del naive
    with r.phase("flap + distill"), torch.enable_grad():
        student = llama_7b(GPU, config=flap20_stand_in_config())  # copy.deepcopy(model), then prune.flap(..., 0.2)
        train = tokens(STEPS * 8, 512)
        distill.distill(
            student,
            model,
            train,
            steps=STEPS,
            loss="forward_kl",
            temperature=1.0,
            lr=5e-5,
            batch_size=8,
            progress=False,
        )
    r.note(
        "walks: SparseGPT and the first GPTQ, 2 of 32 layers each (update memory by column_loop_stand_in; the "
        "second GPTQ walk has the same models alive and the same shapes); combo stays fp16 (GPTQ packs it to "
        "~3.6 GiB: the distillation peak is overstated by at most 9 GiB); combo's perplexity not rehearsed"
    )
    r.note(
        f"FLaP's selection not rehearsed, its result stood in by a model with a 30%-narrower MLP (~80% of the "
        f"parameters); {STEPS} distillation steps (lesson: 1000); {WINDOWS} perplexity windows; the export's "
        f"reload (cell 24) not rehearsed; host: prune.sparsegpt and quant.gptq are all_or_nothing and on CUDA park "
        f"the replaced decoder weights in CPU memory during each call (~12 GiB), not rehearsed (the walk's stand-in "
        f"update replaces nothing)"
    )


PLANS = {"07": lesson07, "09": lesson09, "10": lesson10, "11": lesson11, "12": lesson12}
