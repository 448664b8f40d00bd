"""Plans for the compression lessons (01-06, 08): what each GPU profile does today, at LLaMA-7B's shapes.

Each plan follows its lesson's cells (named in the phases) with the models the lesson keeps alive at the
same time: a second `models.load` is another `llama_7b(GPU)`, `copy.deepcopy` of the GPU model another copy
on the GPU. LLaMA-7B is not cached in CPU memory by models.load (cache_in_memory=False), so the host holds
only the calibration and test token ids. Calibration walks stop after `LAYERS` decoder layers (every layer
has the same shapes; the peak is reached by the second), perplexity runs `WINDOWS` windows, generation
`NEW_TOKENS` tokens; each plan notes it. GPTQ's and SparseGPT's column loops are replaced by
plans.column_loop_stand_in (their memory without the loop; tests/test_rehearsal.py bounds it).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from unittest import mock

import torch

from .. import evaluate, walk
from .harness import GPU, Rehearsal, llama_7b, tokens
from .plans import column_loop_stand_in

SEQLEN = 2048  # the GPU profile's seqlen
SAMPLES = 128  # its calibration samples
LAYERS = 2  # decoder layers walked (of 32)
WINDOWS = 2  # perplexity windows (of the whole test split)
NEW_TOKENS = 2  # generated tokens (lessons: P.new_tokens)


class _EnoughLayers(Exception):
    pass


@contextlib.contextmanager
def first_layers(n: int = LAYERS):
    """Stop every labkit calibration walk after its n-th layer's update (the walk's later layers repeat the
    shapes). Patches calibration_walk where labkit modules imported it; the walk raises _EnoughLayers, caught here."""
    original = walk.calibration_walk

    def walk_n(model, calibration, make_stats, update, *args, **kwargs):
        done, results = [], []

        def update_n(index, layer, stats):
            out = update(index, layer, stats)
            done.append(index)
            if _last_group(kwargs, args, stats):
                results.append(out)
                if len(results) >= n:
                    raise _EnoughLayers
            return out

        with contextlib.suppress(_EnoughLayers):
            return original(model, calibration, make_stats, update_n, *args, **kwargs)
        return results  # the walk's return value: one update result per layer walked

    patched = [
        m
        for m in list(sys.modules.values())
        if m and m.__name__.startswith("labkit") and getattr(m, "calibration_walk", None) is original
    ]
    with contextlib.ExitStack() as stack:
        for module in patched:
            stack.enter_context(mock.patch.object(module, "calibration_walk", walk_n))
        yield


def _last_group(kwargs, args, stats) -> bool:
    """True on a layer's last update: with sequential groups (GPTQ's true-sequential), the one holding down_proj."""
    sequential = kwargs.get("sequential", args[1] if len(args) > 1 else None)
    if not sequential:
        return True
    return any(name.endswith(sequential[-1][-1]) for name in stats) or not stats


@contextlib.contextmanager
def column_loops():
    """GPTQ's and SparseGPT's per-matrix column loops replaced by their memory (plans.column_loop_stand_in)."""
    sparsegpt_module = importlib.import_module("labkit.prune.sparsegpt")  # labkit.prune.sparsegpt is the function
    gptq_module = importlib.import_module("labkit.quant.gptq")

    def sparsegpt_prune(weight, H, *args, **kwargs):  # weight [out, in]; H [in, in]
        pruned = column_loop_stand_in(weight, H, "sparsegpt")
        return pruned, torch.zeros_like(pruned, dtype=torch.bool), 1.0

    def gptq_quantize_weight(W, H, bits, group_size=None, **kwargs):  # W [out, in]; H [in, in]
        rows, columns = W.shape
        n_groups = 1 if group_size is None else -(-columns // group_size)
        weight = column_loop_stand_in(W, H, "gptq")
        return gptq_module.GPTQResult(
            weight,
            torch.zeros(rows, columns, dtype=torch.uint8, device=W.device),
            torch.ones(rows, n_groups, device=W.device),
            torch.zeros(rows, n_groups, device=W.device),
            torch.zeros(columns, dtype=torch.int32, device=W.device),
            1.0,
        )

    with (
        mock.patch.object(sparsegpt_module, "sparsegpt_prune", sparsegpt_prune),
        mock.patch.object(gptq_module, "gptq_quantize_weight", gptq_quantize_weight),
    ):
        yield


def _perplexity(m, seqlen: int = SEQLEN) -> None:
    evaluate.perplexity(m, tokens(1, WINDOWS * seqlen), seqlen, progress=False)


def _calibration(samples: int = SAMPLES, seqlen: int = SEQLEN) -> torch.Tensor:
    return tokens(samples, seqlen)  # [samples, seqlen] on the host, as data.calibration makes it


def _note_repeats(r: Rehearsal) -> None:
    r.note(f"calibration walks: {LAYERS} of 32 layers; perplexity: {WINDOWS} windows (lessons: the whole split)")


# --- the plans -----------------------------------------------------------------------------------


def lesson01(r: Rehearsal) -> None:
    """Magnitude and Wanda, one model on the GPU at a time: cell 4's walk on `model`; cell 11 frees `model`,
    then one fresh copy per scope (global magnitude's threshold by prune.masks.kth_lowest, no concatenation);
    cells 13-14 one sweep copy at a time; cell 17 magnitude_50, freed, then wanda_50 (prune.wanda); cell 20
    wanda_50's state dict to CPU memory, wanda_50 freed, one copy per storage format loaded from it."""
    from .. import prune

    calib = _calibration()
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 4: walk (ColumnStats, one Hessian)"), first_layers():
        explore = model.model.layers[0].self_attn.o_proj  # kept alive by the lesson until its end (cell 23)
        walk.calibration_walk(
            model,
            calib,
            lambda name, lin: walk.Hessian(lin.in_features) if lin is explore else walk.ColumnStats(lin.in_features),
            lambda i, layer, s: None,
        )
    del model
    with r.phase("cell 11: magnitude per layer, then global, one copy at a time"):
        for scope in ("layer", "global"):
            m = llama_7b(GPU)
            prune.magnitude(m, 0.5, scope=scope)
            del m
    with r.phase("cell 13: magnitude sweep, one copy at a time"):
        m = llama_7b(GPU)
        prune.magnitude(m, 0.5)
        _perplexity(m)
        del m
    with r.phase("cell 14: Wanda one shot with the walk's norms, one copy at a time"):
        m = llama_7b(GPU)
        for linear in prune.decoder_linears(m).values():  # the lesson's wanda_one_shot
            norm = torch.ones(linear.in_features, device=GPU)  # ColumnStats.norm: fp32 [in_features]
            linear.weight.data[prune.wanda_mask(linear.weight, norm, 0.5)] = 0
        _perplexity(m)
        del m
    with r.phase("cell 17: magnitude_50, freed, then wanda_50 (prune.wanda)"):
        magnitude_50 = llama_7b(GPU)
        prune.magnitude(magnitude_50, 0.5)
        _perplexity(magnitude_50)
        del magnitude_50
        wanda_50 = llama_7b(GPU)
        with first_layers():
            prune.wanda(wanda_50, calib, 0.5)
        _perplexity(wanda_50)
    with r.phase("cell 20: wanda_50's weights in CPU memory, a copy per storage format"):
        pruned = {name: t.cpu() for name, t in wanda_50.state_dict().items()}
        del wanda_50
        mm = llama_7b(GPU)  # the lesson loads one per format (bitmask, csr): the same shapes
        mm.load_state_dict(pruned)
        del mm, pruned
    _note_repeats(r)
    r.note(
        "explore = layer 0's o_proj (lesson: layer 10; same shape); the sweeps: their 50% point only (every "
        "sparsity has the same shapes); prune.to_sparse not rehearsed (data-dependent)"
    )


def lesson02(r: Rehearsal) -> None:
    """SparseGPT: cell 6 one Hessian of `model` then del model; cell 9 one fresh copy at a time, pruned by
    prune.wanda or prune.sparsegpt (the walk with the model on the GPU), perplexity."""
    from .. import prune

    calib = _calibration()
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 6: one layer's Hessian"), first_layers(1):
        layer = model.model.layers[0].mlp.down_proj
        hessians = {}
        walk.calibration_walk(
            model,
            calib,
            lambda name, lin: walk.Hessian(lin.in_features) if lin is layer else None,
            lambda i, l, s: hessians.update(s),
        )
        H = next(iter(hessians.values())).H
        column_loop_stand_in(layer.weight, H, "sparsegpt")  # the lesson's prune.sparsegpt_prune(W, H, 0.5)
    del model, H  # the lesson's `del model, layer`
    for method in ("wanda", "sparsegpt"):
        with r.phase(f"cell 9: {method} on a fresh copy, perplexity"):
            m = llama_7b(GPU)
            with first_layers(), column_loops():
                getattr(prune, method)(m, calib, 0.5)
            _perplexity(m)
            del m
    _note_repeats(r)
    r.note("SparseGPT's column loop: plans.column_loop_stand_in; prune.to_sparse not rehearsed (data-dependent)")


def lesson03(r: Rehearsal) -> None:
    """Structured pruning: `model` stays alive throughout; cells 8 and 13 load a second copy; cell 16's Taylor
    importance backpropagates through `model`; cell 18's LoRA recovery trains the kept LLM-Pruner copy."""
    from .. import lora, prune

    calib = _calibration()
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 12: perplexity at 128 tokens + generation"):
        _perplexity(model, 128)
    with r.phase("cell 13: FLaP statistics on `model`, FLaP on a second copy"), first_layers():
        stats = prune.flap_stats(model, calib)
    del stats
    with r.phase("cell 13: FLaP on a second copy (the dense copy stands in)"):
        m = llama_7b(GPU)
        _perplexity(m, 128)
        del m
    with r.phase("cell 16: Taylor importance (backward through `model`)"), torch.enable_grad():
        prune.taylor_importance(model, tokens(10, 64), layers=[4, 5])
    with r.phase("cells 16-18: LoRA recovery of the kept copy (the dense copy stands in)"), torch.enable_grad():
        m = llama_7b(GPU)
        r.assume("if not torch.isfinite(norm):", True)  # the gradient norm is finite
        lora.lora_recover(m, tokens(64, 128), steps=2, lr=2e-3, batch_size=4)
        _perplexity(m, 128)
    _note_repeats(r)
    r.note(
        "prune.flap / prune.llm_pruner not rehearsed: which heads and channels stay is data (torch.unique, "
        "boolean indexing: no shapes on fake tensors); the dense second copy stands in for the pruned one (an "
        "upper bound: pruning removes 20-50%); LoRA recovery trains that dense copy"
    )
    r.note(
        "Taylor importance: 2 layers get gradients (lesson: 4-29; the other 24 layers' fp16 gradients, "
        "24 x 0.38 GiB = 9 GiB, are not in the peak); LoRA: 2 of 10 steps"
    )


def lesson04(r: Rehearsal) -> None:
    """Formats and RTN: cell 26's walk keeps some layers' inputs; cell 31 perplexity, then del model; cell 32
    one RTN copy at a time."""
    from .. import models, quant

    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 26: one-sample walk keeping two linears' inputs on the host"), first_layers():
        kept = []

        class KeepInputs(walk.ColumnStats):  # as the lesson's: also keeps the raw inputs [tokens, in] on the CPU
            def add(self, x):
                super().add(x)
                kept.append(x.detach().float().cpu())

        look_at = (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj)
        walk.calibration_walk(
            model,
            tokens(1, SEQLEN),
            lambda name, lin: (KeepInputs if lin in look_at else walk.ColumnStats)(lin.in_features),
            lambda i, l, s: None,
        )
    with r.phase("cell 31: perplexity"):
        _perplexity(model)
    del model
    with r.phase("cell 32: RTN W4 g128 on a fresh copy, unpacked, perplexity"):
        m = llama_7b(GPU)
        quant.rtn(m, 4, 128)
        probe = tokens(1, 64, GPU)
        packed_logits = m(probe, use_cache=False).logits
        for name, layer in quant.quant_linears(m).items():
            models.set_module(m, name, layer.to_float())
        del packed_logits
        _perplexity(m)
        del m
    _note_repeats(r)
    r.note("RTN: one of the six settings (each copy is freed before the next)")


def lesson05(r: Rehearsal) -> None:
    """GPTQ: cell 18's walk (Hessians) on `model`, perplexity, del model; cell 29 one fresh copy at a time
    quantized by quant.gptq (the walk with the model on the GPU); cells 36-37 the last copy next to a fresh one."""
    from .. import quant

    calib = _calibration()
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 18: walk with Hessians"), first_layers():
        walk.calibration_walk(model, calib, lambda name, lin: walk.Hessian(lin.in_features), lambda i, l, s: None)
    with r.phase("cell 28: perplexity"):
        _perplexity(model)
    del model
    with r.phase("cell 29: GPTQ W4 g128 on a fresh copy"):
        m = llama_7b(GPU)
        with first_layers(), column_loops():
            quant.gptq(m, calib, 4, 128)
        _perplexity(m)
    with r.phase("cell 36: RTN W4 copy beside the last (packed) copy"):
        del m
        m = llama_7b(GPU)  # the last copy of cell 29, packed: an RTN W3 g128 copy has its size
        quant.rtn(m, 3, 128)
        m4 = llama_7b(GPU)
        quant.rtn(m4, 4, 128)
        del m4
    _note_repeats(r)
    r.note("GPTQ's column loop: plans.column_loop_stand_in; the GPTQ copy is packed only in the 2 layers walked")


def lesson06(r: Rehearsal) -> None:
    """Activation quantization: `model` stays alive; cell 12 loads `smoothed` and runs quant.smooth; cells 16-18
    load one more copy at a time (W8A16, W8A8, LLM.int8(), NF4) beside `model` (smoothed is deleted first)."""
    from .. import quant

    calib = _calibration()
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 4: walk on 2 samples"), first_layers():
        walk.calibration_walk(
            model, calib[:2], lambda name, lin: walk.ColumnStats(lin.in_features), lambda i, l, s: None
        )
    with r.phase("cell 12: smoothed copy, quant.smooth"):
        smoothed = llama_7b(GPU)
        with first_layers():
            quant.smooth(smoothed, calib, alpha=0.5)
        probe = calib[:1].to(GPU)
        before, after = model(probe).logits, smoothed(probe).logits
        del before, after
    with r.phase("cell 16: W8A8 of the smoothed copy, perplexity"):
        _perplexity(model)
        quant.w8a8(smoothed)
        _perplexity(smoothed)
        del smoothed
    builds = {
        "NF4 + DQ": lambda m: quant.nf4(m, blocksize=64, double_quant=True),
    }
    for label, build in builds.items():
        with r.phase(f"cells 17-18: {label} on a fresh copy beside `model`"):
            m = llama_7b(GPU)
            with first_layers():
                build(m)
            _perplexity(m)
            del m
    _note_repeats(r)
    r.note(
        "cells 17-18: NF4 + DQ only (W8A16 and LLM.int8() copies are one at a time too, and peaked at the "
        "same 25.7 GiB in a full run)"
    )
    r.note("generation speed (evaluate.peak_memory) not rehearsed: batch 1, a few tokens, below perplexity's peak")


def lesson08(r: Rehearsal, lora_steps: int = 2) -> None:
    """Low rank, one 7B model on the GPU at a time: cell 10 measures `model` and frees it (cell 6's rank
    allocation walks `model` alone before that, as cell 12's walk does its copy); every factored model starts
    from a fresh models.load, factored with lowrank.svd, activation-aware (a calibration walk of Hessians, then
    a whitened SVD per linear); cell 13 trains rank-8 LoRA adapters on its factors (lora.lora_recover, batch
    2 x 128 tokens), frees it, then does the same on a fresh dense model (the control)."""
    from .. import lora, lowrank

    calib = _calibration()
    r.assume("if not torch.isfinite(norm)", True)  # the fine-tune checks its gradient norm (fake values)
    r.assume("if info == 0 and", True)  # the damped X Xᵀ is positive definite (and S finite) at the first try
    with r.phase("cell 2: load"):
        model = llama_7b(GPU)
    with r.phase("cell 10: the dense model measured, then freed"):
        _perplexity(model)
        del model
    with r.phase("cell 12: a fresh load, activation-aware SVD at -20% parameters"):
        m = llama_7b(GPU)  # models.load
        with first_layers():
            lowrank.svd(m, param_ratio=0.8, activation_aware=True, calibration=calib)
        _perplexity(m)
    recover = tokens(64, 128)  # data.calibration(tokenizer, 64, 128): [windows, 128] on the host
    with r.phase("cell 13: LoRA on the factored model"), torch.enable_grad():
        lora.lora_recover(m, recover, steps=lora_steps, lr=2e-3, batch_size=2)
        del m
    with r.phase("cell 13: the dense control, a fresh load"), torch.enable_grad():
        control = llama_7b(GPU)  # models.load
        lora.lora_recover(control, recover, steps=lora_steps, lr=2e-3, batch_size=2)
        del control
    _note_repeats(r)
    r.note(
        f"LoRA: {lora_steps} of the lesson's 10 steps (the same shapes every step); the factored model has only "
        "its first 2 layers factored, so it is larger here than in the lesson"
    )
    r.note("cell 6's allocate_ranks walks `model` alone, as cell 12's lowrank.svd walks its fresh copy")


PLANS = {
    "01": lesson01,
    "02": lesson02,
    "03": lesson03,
    "04": lesson04,
    "05": lesson05,
    "06": lesson06,
    "08": lesson08,
}
