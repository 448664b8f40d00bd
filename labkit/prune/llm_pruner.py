"""LLM-Pruner: On the Structural Pruning of Large Language Models (Ma, Fang & Wang, NeurIPS 2023).

1. Dependency-coupled groups. Removing one structure forces the removal of everything wired to
   it, and the group lives or dies together:
       attention group = q_proj rows and o_proj columns of its query heads, k_proj and v_proj rows
                         of their KV head (with GQA: a whole KV group, see structured.py);
       MLP group       = row c of gate_proj and up_proj, column c of down_proj.
2. Importance from the language-modelling loss L on a few calibration samples. The first-order
   Taylor expansion of the loss change when a weight is set to zero gives, per weight (the
   paper's eq. 3-4, "element-wise, first order", the `param_first` setting of its code):
       I(W_k) = |∂L/∂W_k · W_k|
   and a group's importance is the sum over its weights (the code's default aggregation).
3. The same share in every pruned layer, with the first and last layers left whole (they are
   the most sensitive). The paper's LLaMA-7B runs prune layers 4-29 of 32 (attention and MLP);
   here the default skips the first round(L/8) and the last round(L/16) layers, which is exactly
   4 and 2 for 32 layers, and layers 4-27 of SmolLM2-135M's 30.
4. Recovery, a separate step: a short LoRA fine-tune (the paper tunes LoRA adapters on 50 k Alpaca
   samples for about 3 hours); `labkit.lora.lora_recover(model, windows, steps)` runs a few steps.

Ratio: `ratio` is the fraction of the decoder linears' parameters removed over the whole model,
as in FLaP's and the papers' tables (the paper reaches "20%" on LLaMA-7B with 25% per pruned
layer). Each pruned layer removes the same share r = ratio · (all decoder-linear parameters) /
(parameters of the pruned layers). Its rounding is per structure, as in the authors' code (whose
`ch_sparsity` applies to each coupled structure on its own, keeping int(C · (1 − r)) of its C units):
    attention: floor(r · n_kv) whole KV groups, rounded on its own: a group goes only when the
               share covers all of it;
    MLP:       the channels that bring the layer's loss to r of its weights, rounded on their own
               (a channel is fine: 1,728 weights on SmolLM2), so the MLP also takes up what the
               attention's rounding left and `ratio` holds (the authors' code removes less instead).
With GQA the attention unit is coarse: SmolLM2 has 3 KV groups per layer, so a share below 1/3
(ratio < 0.267 with layers 4-27) removes no head at all, only MLP channels, as the authors' code
does at 20%. Rounding the share to the nearest group instead (round(0.25 · 3) = 1) removed a third
of every pruned layer's attention at 20% and scored far worse (issue 16); benchmarks/
bench_prune_reference.py --methods llm_pruner compares this allocation with the authors' code.

LLM-Pruner's public code, run on a GQA model, scores KV head g together with query heads
g, g + n_kv, g + 2·n_kv, ... while removing heads g·group ... (g+1)·group − 1; here a group's
importance sums exactly the weights the surgery removes.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..models import check_llama, linear_layers
from ..transform import all_or_nothing, check_count, check_model, record
from ..walk import check_calibration
from .structured import (
    StructuredReport,
    attention_shape,
    begin,
    channel_param_count,
    check_layers,
    check_ratio,
    finish,
    group_heads,
    group_param_count,
    keep_lowest_removed,
    layer_param_count,
    linear_param_count,
    prune_layer,
)


def default_layers(n_layers: int) -> list[int]:
    """The layers LLM-Pruner prunes: all but the first round(L/8) and the last round(L/16) (4-29 of 32)."""
    return list(range(round(n_layers / 8), n_layers - round(n_layers / 16)))


def group_importance(layer: nn.Module, salience: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-weight importance |w · ∂L/∂w| over each coupled group of one decoder layer.

    salience: {'self_attn.q_proj': [out, in], ...} per-weight importance of the 7 linears.
    Returns (importance per KV group [n_kv], importance per MLP channel [intermediate]).
    """
    s = attention_shape(layer.self_attn)
    q_rows = salience["self_attn.q_proj"].sum(1).view(s.n_kv_heads, s.group * s.head_dim).sum(1)  # rows of q
    o_cols = salience["self_attn.o_proj"].sum(0).view(s.n_kv_heads, s.group * s.head_dim).sum(1)  # columns of o
    k_rows = salience["self_attn.k_proj"].sum(1).view(s.n_kv_heads, s.head_dim).sum(1)
    v_rows = salience["self_attn.v_proj"].sum(1).view(s.n_kv_heads, s.head_dim).sum(1)
    channels = salience["mlp.gate_proj"].sum(1) + salience["mlp.up_proj"].sum(1) + salience["mlp.down_proj"].sum(0)
    return q_rows + o_cols + k_rows + v_rows, channels


def taylor_importance(
    model, calibration: torch.Tensor, layers: Sequence[int] | None = None, batch_size: int = 1
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """First-order Taylor importance of every attention group and MLP channel of `layers`.

    calibration: LongTensor [n_samples, seqlen]; the loss is next-token cross-entropy on it, its
    gradient accumulated over batches (only the decoder linears of `layers` get gradients).
    Returns {layer index: (importance per KV group [n_kv], per MLP channel [intermediate])}.
    """
    check_llama(model, "llm_pruner")
    check_calibration(calibration, model)
    layers = default_layers(len(model.model.layers)) if layers is None else check_layers(model, layers)
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    linears = {i: linear_layers(model.model.layers[i]) for i in layers}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for found in linears.values():
            for linear in found.values():
                linear.weight.requires_grad_(True)
        model.eval()
        for start in range(0, calibration.shape[0], batch_size):
            tokens = calibration[start : start + batch_size].to(device)  # [b, seqlen]
            logits = model(tokens, use_cache=False).logits[:, :-1]  # [b, seqlen − 1, vocab]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()  # gradients add up over batches
        importance = {}
        for i, found in linears.items():
            # |w · g| in fp32: in fp16 the product of a small weight and a small gradient underflows to 0
            # (the gradients themselves add up over the batches in the model's dtype, as autograd keeps them)
            salience = {
                name: (lin.weight.detach().float() * lin.weight.grad.float()).abs() for name, lin in found.items()
            }
            importance[i] = tuple(t.cpu() for t in group_importance(model.model.layers[i], salience))
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return importance


def layer_plan(layer: nn.Module, remove_params: float) -> tuple[int, int]:
    """(KV groups, MLP channels) to remove so one decoder layer loses about `remove_params` weights.

    Per structure, as the authors' code: the layer's share r = remove_params / (its parameters) of
    the KV groups, rounded down (a group goes only when r covers it whole), then the MLP channels
    that make up the rest. Raises ValueError when that would take every MLP channel.
    """
    s = attention_shape(layer.self_attn)
    n_channels = layer.mlp.down_proj.in_features
    group_cost, channel_cost = group_param_count(layer.self_attn), channel_param_count(layer.mlp)
    layer_params = s.n_kv_heads * group_cost + n_channels * channel_cost
    if isinstance(remove_params, bool) or not isinstance(remove_params, numbers.Real) or not remove_params >= 0:
        raise ValueError(f"remove_params={remove_params!r}: allowed is a number of weights >= 0.")
    r = remove_params / layer_params  # the layer's share
    groups = min(math.floor(r * s.n_kv_heads + 1e-9), s.n_kv_heads - 1)  # 1e-9: r · n exactly whole stays whole
    channels = max(0, round((remove_params - groups * group_cost) / channel_cost))
    if channels >= n_channels:
        most = ((s.n_kv_heads - 1) * group_cost + (n_channels - 1) * channel_cost) / layer_params
        raise ValueError(
            f"remove_params={remove_params:,.0f} ({r:.0%} of the layer's {layer_params:,} weights) would remove "
            f"{groups} of its {s.n_kv_heads} KV groups and all {n_channels} MLP channels; a layer keeps at least "
            f"one of each, so it can lose at most {most:.1%} of its weights."
        )
    return groups, channels


@torch.no_grad()
def _prune(model, importance, ratio, layers) -> dict:
    total = linear_param_count(model)
    pruned_params = sum(layer_param_count(model.model.layers[i]) for i in layers)
    r = ratio * total / pruned_params  # the same share in every pruned layer
    if r >= 1:
        largest = pruned_params / total
        raise ValueError(
            f"ratio={ratio:g} asks each of the {len(layers)} pruned layers ({layers[0]}-{layers[-1]}) "
            f"to lose {r:.0%} of its parameters; with these layers the largest allowed ratio is "
            f"below {largest:.3f}. Use a smaller ratio or prune more layers."
        )
    plans = {}
    for i in layers:  # every plan first: a ratio too large for one layer fails before any surgery
        layer = model.model.layers[i]
        try:
            plans[i] = layer_plan(layer, r * layer_param_count(layer))
        except ValueError as error:
            raise ValueError(
                f"ratio={ratio:g} (a share of {r:.0%} in each of the pruned layers {layers[0]}-{layers[-1]}) is too "
                f"large for layer {i}: {error} Use a smaller ratio or prune more layers."
            ) from None
    for i, (groups, channels) in plans.items():
        group_scores, channel_scores = importance[i]
        s = attention_shape(model.model.layers[i].self_attn)
        prune_layer(
            model.model.layers[i],
            group_heads(keep_lowest_removed(group_scores, groups), s.group),
            keep_lowest_removed(channel_scores, channels),
        )
    return {"per_layer_share": r, "layers": list(layers), "removed": plans}


@all_or_nothing
def llm_pruner(
    model,
    calibration: torch.Tensor | None,
    ratio: float,
    *,
    layers: Sequence[int] | None = None,
    importance=None,
    batch_size: int = 1,
) -> StructuredReport:
    """Prune `model` in place with LLM-Pruner (Taylor importance of coupled groups), physically.

    calibration: LongTensor [n_samples, seqlen] for the loss gradient (the paper: 10 samples of 64
        tokens); not needed when `importance` (from taylor_importance on this unpruned model) is given.
    ratio: fraction of all decoder-linear parameters to remove, in [0, 1); the pruned `layers`
        (default: default_layers) each lose the same share of theirs.
    The report's `extra` holds the per-layer share and the layers pruned. Recovery is a separate
    step: labkit.lora.lora_recover(model, windows, steps) (a short LoRA fine-tune, merged back).
    """
    ratio = check_ratio(ratio)
    check_model(model, "prune.llm_pruner", after=("quantize", "lowrank"))
    if calibration is not None:
        check_calibration(calibration, model)
    check_count(batch_size, "batch_size", 1)
    layers = default_layers(len(model.model.layers)) if layers is None else check_layers(model, layers)
    start = time.perf_counter()
    before = begin(model)
    if importance is None:
        if calibration is None:
            raise ValueError(
                "llm_pruner needs calibration token ids [n_samples, seqlen], or importance "
                "from labkit.prune.taylor_importance."
            )
        importance = taylor_importance(model, calibration, layers, batch_size)
    missing = [i for i in layers if i not in importance]
    if missing:
        raise ValueError(
            f"importance has no scores for layers {missing}; compute it with taylor_importance(model, "
            f"calibration, layers={layers})."
        )
    extra = _prune(model, importance, ratio, layers)
    seconds = time.perf_counter() - start
    record(model, "LLM-Pruner", f"{ratio:.0%} removed", "prune")
    return finish("llm_pruner", ratio, before, model, seconds, False, **extra)


__all__ = [
    "default_layers",
    "group_importance",
    "layer_plan",
    "llm_pruner",
    "taylor_importance",
]
