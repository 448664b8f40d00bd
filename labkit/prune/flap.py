"""FLaP: Fluctuation-based Adaptive Structured Pruning (An, Zhao, Yu, Tang & Wang, AAAI 2024).

Three steps, no retraining:

1. Fluctuation metric (the paper's WIFV, weighted input feature variance). An input channel j of
   an output projection (o_proj, down_proj) whose value hardly varies over tokens can be replaced
   by a constant with little loss. Its score is that variance times the energy of the weights
   it feeds:
        S_j = Var_tokens(x_j) · ‖W[:, j]‖²₂
   An attention unit's score gathers its channels (a head owns head_dim columns of o_proj).
2. Adaptive global allocation. Scores of different layers and of attention vs MLP are not on one
   scale, so each layer's channel scores are standardized per structure type,
   z = (S − mean) / std over that layer's o_proj (or down_proj) channels, and a unit takes the
   mean z of its channels (the authors' code). All units of all layers then compete: the highest
   z are kept until the kept parameters are closest to (1 − ratio) of the decoder linears, each
   unit weighted by the parameters it holds (an attention unit ≈ 171 MLP channels on LLaMA-7B
   and on SmolLM2-135M alike). So layers and modules get different ratios, chosen by the data.
3. Bias compensation: the removed channels' mean contribution W[:, R] · mean(x_R) becomes the
   bias of o_proj / down_proj (labkit.prune.structured.compensation).

Grouped-query attention: the attention unit is a whole KV group (a KV head and the query heads
that read it), the smallest unit that leaves every layer a valid GQA layout (see structured.py);
the authors' GQA code does the same (`head_dim * gqa_groups` channels per unit). Every layer
keeps at least its best attention unit and its best MLP channel (a layer with no heads left is
not a Llama layer any more); the authors' code does not need this on LLaMA-7B's 32 heads.

Differences from the authors' code, on purpose: the channel variance is the population variance
over all calibration tokens (labkit.walk.ColumnStats) rather than their running estimate, and
the attention metric is not squared (their prune.py squares it before standardizing; the paper's
equation does not).
"""

from __future__ import annotations

import time

import torch

from ..models import check_llama
from ..transform import all_or_nothing, check_count, check_model, record
from ..walk import ColumnStats, calibration_walk, check_calibration
from .structured import (
    StructuredReport,
    attention_shape,
    begin,
    channel_param_count,
    check_ratio,
    finish,
    group_heads,
    group_param_count,
    prune_layer,
)

OBSERVED = ("self_attn.o_proj", "mlp.down_proj")


def fluctuation(var: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLaP's fluctuation score of every input channel of one output projection (WIFV).

    var: [in] variance of each input channel over calibration tokens; weight: [out, in]
    -> [in]:  S_j = var_j · Σ_i W_ij²."""
    return var.float().to(weight.device) * weight.detach().float().pow(2).sum(0)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(S − mean) / std over one layer's channels of one structure type (the authors' code)."""
    return (scores - scores.mean()) / scores.std().clamp_min(torch.finfo(torch.float32).tiny)


def flap_unit_scores(var: torch.Tensor, weight: torch.Tensor, unit: int) -> torch.Tensor:
    """FLaP's score of every prunable unit of one output projection: the fluctuation of each input
    channel (step 1), standardized over the layer's channels (step 2), averaged over the `unit`
    consecutive channels a unit owns (the authors' code).

    var: [in] variance of each input channel; weight: [out, in]; unit: channels per unit (a KV group's
    group · head_dim columns of o_proj; 1 for an MLP channel of down_proj) -> [in // unit]."""
    return standardize(fluctuation(var, weight)).view(-1, unit).mean(1)


def _checked_scores(z, n_units: int, where: str) -> torch.Tensor:
    """A learner's unit_scores answer: one finite float per unit, or ValueError (nothing pruned yet)."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != (n_units,):
        got = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(
            f"unit_scores returned {got} for {where}; it must return a float tensor [{n_units}], one score "
            f"per unit. The model is unchanged."
        )
    if not torch.isfinite(z).all():
        raise ValueError(f"unit_scores returned NaN or infinite scores for {where}. The model is unchanged.")
    return z.detach().float().cpu()


@torch.no_grad()
def flap_stats(model, calibration: torch.Tensor, device=None, batch_size: int = 8) -> list[dict[str, ColumnStats]]:
    """Input statistics of o_proj and down_proj of every layer, on the unpruned model.

    calibration: LongTensor [n_samples, seqlen]. Returns per layer {'self_attn.o_proj': ColumnStats,
    'mlp.down_proj': ColumnStats} (mean and variance per input channel). The walk does not change
    the model: FLaP scores every layer first, then allocates globally.
    """
    check_llama(model, "flap")
    check_calibration(calibration, model)

    def make_stats(name, linear):
        return ColumnStats(linear.in_features, device=linear.weight.device) if name in OBSERVED else None

    return calibration_walk(
        model,
        calibration,
        make_stats,
        lambda index, layer, stats: stats,
        device=device,
        batch_size=batch_size,
        desc="flap statistics",
    )


def flap_scores(
    model, stats: list[dict[str, ColumnStats]], unit_scores=flap_unit_scores
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (score of each KV group [n_kv_heads], score of each MLP channel [intermediate]): FLaP's
    standardized fluctuation, from `stats` (flap_stats on this model, unpruned).

    unit_scores: labkit's flap_unit_scores (default) or your own function unit_scores(var [in], weight [out, in], unit)
    -> [in // unit] (lesson 03's "build it"); an answer of another shape, or not finite, raises ValueError."""
    layers = model.model.layers
    if len(stats) != len(layers) or any(set(s) != set(OBSERVED) for s in stats):
        raise ValueError(
            f"stats must hold {OBSERVED} statistics for each of the {len(layers)} layers "
            f"(labkit.prune.flap_stats on this model, before it was pruned)."
        )
    if not callable(unit_scores):
        raise ValueError(
            f"unit_scores={unit_scores!r}: pass a function unit_scores(var, weight, unit) -> [in // unit]."
        )
    out = []
    for index, (layer, s) in enumerate(zip(layers, stats)):
        shape = attention_shape(layer.self_attn)
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        o_var, down_var = s["self_attn.o_proj"].var, s["mlp.down_proj"].var
        groups = unit_scores(o_var.clone(), o.weight.detach().clone(), shape.group * shape.head_dim)
        channels = unit_scores(down_var.clone(), down.weight.detach().clone(), 1)
        out.append(
            (
                _checked_scores(
                    groups, shape.n_kv_heads, f"layers.{index}.self_attn.o_proj (unit {shape.group * shape.head_dim})"
                ),
                _checked_scores(channels, down.in_features, f"layers.{index}.mlp.down_proj (unit 1)"),
            )
        )
    return out


def flap_allocation(
    model, scores: list[tuple[torch.Tensor, torch.Tensor]], ratio: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Which KV groups and MLP channels each layer keeps: the adaptive global search (FLaP step 2).

    scores: per layer (score of each KV group [n_kv_heads], of each MLP channel [intermediate]), as
    flap_scores returns them. Returns (kept KV groups per layer, kept MLP channels per layer), index tensors.
    """
    ratio = check_ratio(ratio)
    unit_z, unit_cost, owner = [], [], []  # one entry per candidate unit, over all layers
    for index, (layer, (groups, channels)) in enumerate(zip(model.model.layers, scores)):
        unit_z += [groups, channels]
        unit_cost += [
            torch.full_like(groups, group_param_count(layer.self_attn), dtype=torch.float64),
            torch.full_like(channels, channel_param_count(layer.mlp), dtype=torch.float64),
        ]
        owner += [
            torch.stack(
                [
                    torch.full_like(groups, index, dtype=torch.long),
                    torch.zeros_like(groups, dtype=torch.long),
                    torch.arange(groups.numel()),
                ],
                1,
            ),
            torch.stack(
                [
                    torch.full_like(channels, index, dtype=torch.long),
                    torch.ones_like(channels, dtype=torch.long),
                    torch.arange(channels.numel()),
                ],
                1,
            ),
        ]
    z, cost, owner = torch.cat(unit_z), torch.cat(unit_cost), torch.cat(owner)  # owner: [units, (layer, kind, index)]
    order = torch.sort(z, descending=True, stable=True).indices
    kept_params = torch.cumsum(cost[order], 0)
    target = (1 - ratio) * cost.sum()
    n_keep = int(torch.argmin((kept_params - target).abs())) + 1  # closest to the budget (the authors' rule)
    keep = torch.zeros(z.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    keep_groups, keep_channels = [], []
    for index in range(len(scores)):
        for kind, out in ((0, keep_groups), (1, keep_channels)):
            mine = (owner[:, 0] == index) & (owner[:, 1] == kind)
            kept = owner[mine & keep, 2]
            if kept.numel() == 0:  # never empty a layer: keep its best unit
                best = torch.argmax(torch.where(mine, z, torch.tensor(-float("inf"))))
                kept = owner[best, 2:3]
            out.append(kept.sort().values)
    return keep_groups, keep_channels


@torch.no_grad()
@all_or_nothing
def flap(
    model,
    calibration: torch.Tensor | None,
    ratio: float,
    bias: bool = True,
    stats=None,
    device=None,
    batch_size: int = 8,
    unit_scores=flap_unit_scores,
) -> StructuredReport:
    """Prune `model` in place with FLaP: a physically smaller dense model.

    calibration: LongTensor [n_samples, seqlen] (labkit.data.calibration); not needed when `stats`
        (from flap_stats on this same unpruned model) is given, e.g. to prune copies at several ratios.
    ratio: fraction of the decoder linears' parameters to remove, in [0, 1).
    bias: add FLaP's bias compensation to o_proj and down_proj.
    unit_scores: labkit's flap_unit_scores or your own function of its signature (see flap_scores); every layer's
        answer is checked before anything is pruned.
    Returns a StructuredReport (parameters before/after, heads and channels kept per layer).
    """
    ratio = check_ratio(ratio)
    check_model(model, "prune.flap", after=("quantize", "lowrank"))
    start = time.perf_counter()
    before = begin(model)
    if stats is None:
        if calibration is None:
            raise ValueError(
                "flap needs calibration token ids [n_samples, seqlen], or stats from labkit.prune.flap_stats."
            )
        check_calibration(calibration, model)
        check_count(batch_size, "batch_size")
        stats = flap_stats(model, calibration, device=device, batch_size=batch_size)
    scores = flap_scores(model, stats, unit_scores)
    keep_groups, keep_channels = flap_allocation(model, scores, ratio)
    for layer, s, groups, channels in zip(model.model.layers, stats, keep_groups, keep_channels):
        shape = attention_shape(layer.self_attn)
        prune_layer(
            layer,
            group_heads(groups, shape.group),
            channels,
            attn_mean=s["self_attn.o_proj"].mean if bias else None,
            mlp_mean=s["mlp.down_proj"].mean if bias else None,
        )
    record(model, "FLaP", f"{ratio:.0%} removed", "prune")
    return finish("flap", ratio, before, model, time.perf_counter() - start, bias)


__all__ = ["flap", "flap_allocation", "flap_scores", "flap_stats", "flap_unit_scores", "fluctuation", "standardize"]
