"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023), then W8A8: int8 weights per channel, int8 activations per token.

Activations are hard to quantize (a few input channels are 10-100x larger than the rest, in every
token); weights are easy. SmoothQuant moves part of the difficulty from X to W with an exact rewrite
(eq. 3), per input channel j:
    Y = X W = (X diag(s)⁻¹) (diag(s) W),         s_j = max|X_j|^α / max|W_j|^(1−α)   (eq. 4)
α = 0.5 splits the range evenly: after smoothing, max|X̂_j| = max|Ŵ_j| = sqrt(max|X_j| · max|W_j|).
(The paper writes W as [in, out]; here W is nn.Linear's [out, in], so channel j is a column of W.)
max|X_j| comes from calibration data. The division by s costs nothing at run time: it is folded into
the RMSNorm weight that produces X (q/k/v share input_layernorm, gate/up share
post_attention_layernorm), and the multiplication into the weights. As in the reference code
(github.com/mit-han-lab/smoothquant, smooth.py), o_proj and down_proj are not smoothed: no
per-channel scale precedes their inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import walk
from ..transform import all_or_nothing, check_count, check_model, record, replace_data
from .int8 import int8_matmul, matmul_path
from .llm_int8 import Int8Report, to_int8

# norm -> the linears it feeds (in a Llama decoder layer)
SMOOTH_GROUPS = {
    "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
}


def check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha={alpha!r}: the migration strength must be a number in [0, 1] "
            f"(0: activations unchanged, 1: all of the range moved into the weights; paper: 0.5)."
        )


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s [in] from max|X_j| [in] and the weights [out_i, in] that read X (SmoothQuant eq. 4).

    max|W_j| is taken over the rows of all those weights together (q, k and v share one s).
    Clamped at 1e-5 like the reference code, so a channel that is never active gets no 1/0."""
    check_alpha(alpha)
    if not torch.isfinite(act_max).all():
        raise ValueError("act_max holds non-finite values: a calibration activation was NaN or inf.")
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)  # [in]
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def fold_smoothing(norm: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """X̂ = X diag(s)⁻¹ via the norm's weight; Ŵ = W diag(s) via the linears' columns (eq. 3)."""
    replace_data(norm.weight, norm.weight / s.to(norm.weight))
    for linear in linears:
        replace_data(linear.weight, linear.weight * s.to(linear.weight)[None, :])


@dataclass
class SmoothReport:
    """Per smoothed norm ('layers.3.input_layernorm'): the calibration's max|X_j|, the max|W_j| of the
    linears it feeds, and s, all [hidden] on the CPU, before smoothing (after: act_max / s, weight_max · s)."""

    alpha: float
    seconds: float = 0.0
    act_max: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_max: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
@all_or_nothing
def smooth(
    model, calibration: torch.Tensor, alpha: float = 0.5, device=None, batch_size: int = 8, factors=None
) -> SmoothReport:
    """Smooth every decoder layer of `model` in place (the function is unchanged, up to float rounding).

    calibration: LongTensor [n_samples, seqlen]. max|X_j| is observed with labkit.walk.ColumnStats on
    the first linear of each group, layer by layer (the shared calibration walk).
    factors: None (labkit's smoothing_factors) or your own factors(act_max [in], weights, alpha) -> s [in]
    with smoothing_factors' contract (lesson 06's "build it"); an s that is not finite and positive, or
    of another shape, raises ValueError, the model unchanged."""
    check_alpha(alpha)
    if factors is not None and not callable(factors):
        raise ValueError(f"factors={factors!r}: pass a function factors(act_max, weights, alpha) -> s, or None.")
    learner = factors is not None  # a learner's function gets copies: it cannot change the model by accident
    factors = factors or smoothing_factors
    check_model(model, "quant.smooth")
    walk.check_calibration(calibration, model)
    check_count(batch_size, "batch_size")
    report = SmoothReport(alpha)
    start = time.perf_counter()
    watched = {names[0]: norm for norm, names in SMOOTH_GROUPS.items()}  # q_proj and gate_proj see each norm's output

    def make_stats(name, linear):
        return walk.ColumnStats(linear.in_features, device=linear.weight.device) if name in watched else None

    def update(index, layer, stats):
        for first, norm_name in watched.items():
            act_max = stats[first].max_abs  # [hidden]
            if not torch.isfinite(act_max).all():
                raise ValueError(
                    f"layer {index}: the calibration activations entering {norm_name}'s linears hold "
                    f"NaN or inf; smoothing factors cannot be computed from them."
                )
            linears = [layer.get_submodule(n) for n in SMOOTH_GROUPS[norm_name]]
            weights = [lin.weight.detach().clone() if learner else lin.weight for lin in linears]
            s = factors(act_max.clone() if learner else act_max, weights, alpha)
            if not isinstance(s, torch.Tensor) or s.shape != act_max.shape or not (torch.isfinite(s) & (s > 0)).all():
                got = f"shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(
                    f"factors returned {got} for layers.{index}.{norm_name}; s must be a finite, positive "
                    f"[{act_max.numel()}] tensor (one factor per input channel). The model is unchanged."
                )
            key = f"layers.{index}.{norm_name}"
            report.act_max[key] = act_max.cpu()
            report.weight_max[key] = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0).cpu()
            report.scales[key] = s.cpu()
            fold_smoothing(layer.get_submodule(norm_name), linears, s)

    walk.calibration_walk(
        model, calibration, make_stats, update, device=device, batch_size=batch_size, desc="SmoothQuant"
    )
    report.seconds = time.perf_counter() - start
    record(model, "SmoothQuant smoothing", f"alpha {alpha:g}", "smooth")
    return report


@all_or_nothing
def w8a8(model) -> Int8Report:
    """Every decoder linear -> int8 weights (per output channel) and int8 activations (per token, dynamic);
    the matmul runs in int8 with int32 accumulation (labkit.quant.int8.int8_matmul)."""
    report = _to_int8(model, "quant.w8a8", Int8Report("W8A8", "per-channel W, per-token A"), "per-token")
    report.matmul = _probe_path(model)
    return report


@all_or_nothing
def w8a16(model) -> Int8Report:
    """Every decoder linear -> int8 weights (per output channel), dequantized on the fly; float activations."""
    report = _to_int8(model, "quant.w8a16", Int8Report("W8A16", "per-channel W, float A"), "float")
    report.matmul = "float (weights dequantized on the fly)"
    return report


def _to_int8(model, entry: str, report: Int8Report, act: str) -> Int8Report:
    """w8a8 and w8a16: check, convert every decoder linear with activations `act`, record, time."""
    check_model(model, entry)
    start = time.perf_counter()
    report.layers, report.params = to_int8(model, act)
    record(model, report.method, report.setting, "quantize")
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
@all_or_nothing
def smoothquant(
    model, calibration: torch.Tensor, alpha: float = 0.5, device=None, batch_size: int = 8, factors=None
) -> Int8Report:
    """SmoothQuant W8A8: smooth(model, calibration, alpha, factors=factors), then w8a8(model). Returns the
    W8A8 report with `smoothing` (the SmoothReport) attached."""
    check_alpha(alpha)
    smoothing = smooth(model, calibration, alpha, device, batch_size, factors=factors)
    report = w8a8(model)
    report.method, report.setting = "SmoothQuant W8A8", f"alpha {alpha:g}, per-channel W, per-token A"
    report.seconds += smoothing.seconds
    report.smoothing = smoothing
    return report


def _probe_path(model) -> str:
    """Which int8 matmul a 32-token batch takes on the model's device (the path is chosen per call)."""
    device = next(model.parameters()).device
    int8_matmul(
        torch.zeros(32, 64, dtype=torch.int8, device=device), torch.zeros(64, 64, dtype=torch.int8, device=device)
    )
    return matmul_path()
