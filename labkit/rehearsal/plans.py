"""Plans: what the GPU profile does today, written as functions of a Rehearsal (see harness.py).

Each plan calls labkit and transformers as the lesson does, at LLaMA-7B's shapes, with `GPU` where
the profile says "cuda". Where a lesson needs something the rehearsal has not (the LLaMA tokenizer,
the WikiText-2 tokens), fake token ids of the same shape stand in. Loops over identical shapes run
only a few iterations (their peak is reached in the first ones); each plan notes how many.
"""

from __future__ import annotations

import contextlib

import torch

from .. import evaluate, walk
from .harness import GPU, HOST, Rehearsal, llama_7b, tokens

PROMPT_TOKENS = 16  # lesson 00's prompt, about 12 LLaMA tokens


def lesson00(r: Rehearsal, windows: int = 2, new_tokens: int = 2, seqlen: int = 2048) -> None:
    """Lesson 00 on the GPU profile: load LLaMA-7B fp16 onto the GPU, generate, perplexity at batch 1."""
    with r.phase("load"):
        # models.load(device="cuda") passes device_map="cuda": weights go from the memory-mapped
        # safetensors shards to the GPU tensor by tensor (the loader itself is not rehearsed).
        model = llama_7b(GPU)
    with r.phase("generate"):
        ids = tokens(1, PROMPT_TOKENS, GPU)
        r.assume("unfinished_sequences.max() == 0", lambda n: n >= new_tokens - 1)  # stop after new_tokens
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with r.phase("perplexity"):
        evaluate.perplexity(model, tokens(1, windows * seqlen), seqlen, progress=False)
    r.note(f"{new_tokens} generated tokens (lesson: 30 and 128), {windows} perplexity windows (lesson: all 163)")


def copies(r: Rehearsal, n: int = 2) -> None:
    """n LLaMA-7B fp16 models on the GPU at once: what `copy.deepcopy` of a GPU model does (lesson 12),
    or a second models.load while the first is alive (01, 03, 06)."""
    if n < 1:
        raise ValueError(f"n={n!r}: need at least one copy.")
    models = []
    for i in range(n):
        with r.phase(f"copy {i + 1}"):
            models.append(llama_7b(GPU))


def two_models(r: Rehearsal) -> None:
    """Two LLaMA-7B fp16 models on the GPU at once."""
    copies(r, 2)


class _EnoughLayers(Exception):
    pass


def calibration_walk(
    r: Rehearsal,
    method: str = "gptq",
    resident: str = "gpu",
    layers: int = 2,
    samples: int = 128,
    seqlen: int = 2048,
    batch_size: int = 8,
    activations: str = "device",
) -> None:
    """labkit.walk.calibration_walk as GPTQ / SparseGPT use it: Hessians of every linear's inputs (fp32,
    4096² and 11008²), then the method's update, on 128 samples x 2048 tokens, the first `layers` layers.

    resident: where the model lives. "gpu" is what the GPU profile does today (models.load puts LLaMA-7B
    on the GPU; the walk then moves nothing); "host": the model in CPU memory, one layer at a time on the
    GPU; "streamed": labkit.stream (the decoder layers on `meta`, each read from the shards onto the GPU
    when its turn comes and written back to a new folder; see _FakeShards).
    activations: the walk's `activations` argument: "host" keeps the calibration activations in CPU
    memory and moves one batch at a time to the GPU (the walk's default); "device" keeps them on the GPU.
    The update runs the method's memory, not its column loop (see column_loop_stand_in).
    """
    if method not in ("gptq", "sparsegpt"):
        raise ValueError(f"method={method!r}: allowed are 'gptq', 'sparsegpt'.")
    if resident not in ("gpu", "host", "streamed"):
        raise ValueError(f"resident={resident!r}: allowed are 'gpu', 'host', 'streamed'.")
    with r.phase("load"):
        model = llama_7b(GPU if resident == "gpu" else HOST) if resident != "streamed" else _skeleton()
    calibration = tokens(samples, seqlen)  # [samples, seqlen] on the host, as data.calibration makes it
    sequential = walk.SEQUENTIAL_GROUPS if method == "gptq" else None  # GPTQ's true-sequential groups
    groups = len(sequential) if sequential else 1
    done = {"updates": 0}

    def make_stats(name, linear):
        if done["updates"] == layers * groups:  # the next layer is on the GPU: stop before observing it
            raise _EnoughLayers
        return walk.Hessian(linear.in_features, device=linear.weight.device)

    def update(index, layer, stats):
        for name, hessian in stats.items():
            if method == "gptq" and not torch.isfinite(hessian.xtx).all():  # as gptq.update checks
                raise ValueError(f"non-finite Hessian at layers.{index}.{name}")
            column_loop_stand_in(layer.get_submodule(name).weight, hessian.H, method)
        done["updates"] += 1

    with r.phase("walk"), contextlib.suppress(_EnoughLayers):
        walk.calibration_walk(
            model,
            calibration,
            make_stats,
            update,
            device=GPU,
            sequential=sequential,
            batch_size=batch_size,
            activations=activations,
            layers=_FakeShards() if resident == "streamed" else None,
        )
    r.note(
        f"{method}, model on the {resident}, activations on the {activations}, {layers} of 32 layers walked "
        f"(all layers have the same shapes)"
    )


def _skeleton():
    """labkit.stream.skeleton at LLaMA-7B's shapes: decoder layers on meta, the embedding, final norm, output
    layer and rotary buffer in CPU memory."""
    model = llama_7b("meta")
    inner = model.model
    for module in (inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head):
        module.to_empty(device=HOST)
    return model


class _FakeShards:
    """labkit.stream.ShardLayers' memory without files: load puts the layer's weights on the device
    (safe_open reads each tensor and moves it there); store copies every weight to the host at once, as
    save_file is given them, then sends the layer back to meta."""

    def load(self, index, layer, device):
        layer.to_empty(device=device)

    def store(self, index, layer):
        tensors = {n: t.detach().contiguous().cpu() for n, t in layer.state_dict().items()}
        del tensors  # written to disk
        layer.to("meta")


def column_loop_stand_in(weight: torch.Tensor, H: torch.Tensor, method: str) -> torch.Tensor:
    """The memory of gptq._gptq / sparsegpt_prune on one linear, without their column loop.

    weight: [out, in] fp16; H: [in, in] fp32. Their loop over 4096 to 11008 columns costs ~24 ms per
    column on fake tensors (minutes per layer), so the rehearsal allocates what they allocate instead:
    the fp32 working copy of W, the full-size outputs (GPTQ: Q, Losses, codes; SparseGPT: the mask),
    labkit's own inverse_hessian_cholesky (H's clone, the Cholesky factors, the inverse), one block's
    temporaries, and the result in W's dtype. tests/test_rehearsal.py checks this against the real
    functions at a smaller shape.
    """
    from ..quant.formats import group_index, quantize_codes

    rows, columns = weight.shape
    # the working copy, made as each function makes it (GPTQ: fp32 then a clone; SparseGPT: a clone then fp32)
    W = weight.float().clone() if method == "gptq" else weight.detach().clone().float()  # [out, in] fp32
    Hinv, _ = walk.inverse_hessian_cholesky(H)  # [in, in]
    block = min(128, columns)
    # GPTQ: W1, Q1, Err1, Losses1 and two temporaries of its group grids; SparseGPT: W1 and walk.obs_block's Q1,
    # Err1, Losses1 (its mask's scores are freed before the block loop starts)
    temporaries = [torch.zeros(rows, block, device=W.device) for _ in range(6 if method == "gptq" else 4)]
    if method == "gptq":
        Q, losses = torch.zeros_like(W), torch.zeros_like(W)
        n_groups = -(-columns // block)
        scales = torch.ones(rows, n_groups, device=W.device)
        g_idx = group_index(columns, block, W.device)
        codes = quantize_codes(Q, scales[:, g_idx], scales[:, g_idx], 4)  # as _gptq ends: [out, in] uint8
        out = Q.to(weight.dtype)
        del Q, losses, codes
    else:
        mask = torch.zeros_like(W, dtype=torch.bool)
        losses = torch.zeros_like(W)  # Losses1's share, and the slack of the ops in the column loop
        out = W.to(weight.dtype)
        del mask, losses
    del W, Hinv, temporaries
    return out
