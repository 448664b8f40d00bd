"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024), from torch operations.

A few input channels carry much larger activations than the rest; the weights that read them matter most,
yet round-to-nearest gives every weight the same absolute error. AWQ protects them with an exact rewrite per
input channel j, as SmoothQuant does, but for the weights' sake (sec. 3.2):

    Q(W) X  ->  Q(W · diag(s)) · (diag(s)⁻¹ X),        s = s_X^α,  s_X[j] = mean |X_j|   (eq. 5)

Scaling column j up by s_j > 1 shrinks its relative rounding error (the group's scale barely moves when one
column grows); the division is folded into the operation that produces X, so it costs nothing at run time.
α is searched on a grid of n_grid values in [0, 1) for each group of linears that read one input (eq. 5):

    α* = argmin_α  Σ_W ‖Q(W diag(s)) diag(s)⁻¹ X − W X‖²       (α = 0: s = 1, plain round-to-nearest)

Here the loss is computed from H = 2/n · Σ x xᵀ (walk.Hessian, the statistic GPTQ uses) instead of the
activations themselves: with Δ = (Q(W diag s) − W diag s) diag(s)⁻¹, ‖Δ X‖² / n = tr(Δ H Δᵀ) / 2, exactly, and
H is [in, in] however many tokens were seen. `scaled_error_naive` is the twin on the activations.

Where the scales go in a Llama decoder layer (the reference code's groups, github.com/mit-han-lab/llm-awq):
    input_layernorm          -> q_proj, k_proj, v_proj    (the norm's weight divided by s)
    v_proj (its output rows) -> o_proj                     (with GQA, one s per KV channel, shared by the query
                                                            heads that read it; the reference skips o_proj then)
    post_attention_layernorm -> gate_proj, up_proj
    up_proj (its output rows)-> down_proj                  (act(gate) · up is elementwise per channel)
Then an optional clipping search (sec. 3.3 of the code, `auto_clip`): each group's range is shrunk to the
fraction of max|w| that minimizes that group's output error; q and k are not clipped (as in the reference).
Finally every linear is quantized round-to-nearest (asymmetric integer grid, groups) into a QuantLinear: the
one packed 4-bit layout that GPTQ writes and that quant.to_cpu_kernels, kernels.fuse and the exports read.

Differences from the reference code, on purpose: the loss of q/k/v (and gate/up) is the error of those linears'
outputs, not of the whole attention (or MLP) block's output; each layer is calibrated on the outputs of the
already-quantized layers before it (the shared walk, as GPTQ), not on the float model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import models, walk
from ..transform import all_or_nothing, check_count, check_model, record, replace_data
from .formats import fake_quantize
from .formats import quantize as labkit_quantize
from .qlinear import QuantLinear, QuantReport, check_model_settings, set_module

# the operation whose output feeds a group -> the linears of the group (q, k and v read one input)
AWQ_GROUPS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.v_proj": ("self_attn.o_proj",),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.up_proj": ("mlp.down_proj",),
}
NOT_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")  # their outputs meet in q·kᵀ: no per-linear error to measure


class AWQStats:
    """What AWQ needs from the inputs X of a group of linears: s_X = mean |X_j| (the activation scale, eq. 5)
    and H = 2/n · Σ x xᵀ (walk.Hessian), from which every loss of the search follows."""

    def __init__(self, in_features: int, device=None):
        self.hessian = walk.Hessian(in_features, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, in_features]
        self.hessian.add(x)
        self.abs_sum = self.abs_sum.to(x.device) + x.abs().sum(0, dtype=torch.float64)

    @property
    def mean_abs(self) -> torch.Tensor:  # s_X: [in_features]
        return (self.abs_sum / max(self.hessian.n, 1)).float()


def scaled_error(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None) -> float:
    """The output error of quantizing W with input scales s (eq. 5), per token, from H = 2/n · Σ x xᵀ.

    W: [out, in]; H: [in, in]; s: [in] positive. Δ = (Q(W diag s) − W diag s) diag(s)⁻¹ is the error the
    layer makes on the original X; ‖Δ X‖² / n = tr(Δ H Δᵀ) / 2."""
    Ws = W.float() * s[None, :]
    delta = (fake_quantize(Ws, bits, group_size) - Ws) / s[None, :]  # [out, in]
    return ((delta @ H) * delta).sum().item() / 2


def scaled_error_naive(W: torch.Tensor, X: torch.Tensor, s: torch.Tensor, bits: int, group_size: int | None) -> float:
    """The slow twin of scaled_error, on the activations X [tokens, in] themselves (the paper's form):
    ‖Q(W diag s) · (diag(s)⁻¹ X) − W X‖² / tokens."""
    Wq = fake_quantize(W.float() * s[None, :], bits, group_size)
    return ((X / s) @ Wq.T - X @ W.float().T).pow(2).sum().item() / X.shape[0]


def candidate_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α [in], normalized so that max(s) · min(s) = 1 (as the reference code: it keeps s near 1)."""
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def shared_by_kv_heads(mean_abs: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """s_X of o_proj's input [heads · head_dim], averaged over the n_rep query heads that read one KV head.

    Under GQA o_proj's scale is folded into v_proj's rows, one per KV-head channel, so the query heads that
    share a KV head (heads h with h // n_rep equal, as transformers' repeat_kv orders them) must share s."""
    per_kv = mean_abs.reshape(-1, n_rep, head_dim)  # [kv_heads, n_rep, head_dim]
    return per_kv.mean(1, keepdim=True).expand_as(per_kv).reshape(-1)


def search_scale(
    weights: list[torch.Tensor],
    H: torch.Tensor,
    mean_abs: torch.Tensor,
    bits: int,
    group_size: int | None,
    n_grid: int = 20,
    loss=None,
) -> tuple[torch.Tensor, float, list[float]]:
    """The grid search of eq. 5 for one group of linears that read one input.

    weights: [out_i, in] each; H: [in, in] of their input; mean_abs: s_X [in]. Tries α = 0, 1/n_grid, …,
    (n_grid − 1)/n_grid and returns (s [in] of the best α, the best α, the summed loss of every α).
    loss: scaled_error (default) or your own with its contract."""
    loss = loss or scaled_error
    losses = [
        sum(loss(W, H, candidate_scales(mean_abs, i / n_grid), bits, group_size) for W in weights)
        for i in range(n_grid)
    ]
    best = min(range(n_grid), key=losses.__getitem__)  # the first of equal losses: α = 0 (RTN) wins a tie
    return candidate_scales(mean_abs, best / n_grid), best / n_grid, losses


def search_clip(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, n_grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """The clipping search of the reference code (auto_clip): for each row and group of W [out, in], the range
    ±max|w| · (1 − i / n_grid), i < max_shrink · n_grid, whose quantization error on that group's output
    contribution, δ H_gg δᵀ with H_gg the group's diagonal block of H [in, in], is smallest.
    Returns max_val [out, n_groups]: clamp each group to ±max_val before quantizing."""
    out_features, in_features = W.shape
    size = group_size or in_features
    w = W.float().reshape(out_features, -1, size)  # [out, n_groups, group]
    blocks = torch.stack([H[g : g + size, g : g + size] for g in range(0, in_features, size)])  # [n_groups, gs, gs]
    org_max = w.abs().amax(-1)  # [out, n_groups]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None])
        delta = fake_quantize(clipped.reshape(out_features, -1), bits, group_size).reshape_as(w) - w
        err = torch.einsum("ogk,gkl,ogl->og", delta, blocks, delta)  # [out, n_groups]
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def fold_scale(
    prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor, n_rep: int = 1, head_dim: int = 0
) -> None:
    """X -> X diag(s)⁻¹ through `prev` (a norm's weight, or a linear's output rows), W -> W diag(s) (eq. 5).

    n_rep > 1: prev is v_proj under GQA and s [heads · head_dim] is shared by the n_rep query heads of each
    KV head (shared_by_kv_heads); v_proj's rows [kv_heads · head_dim] take one value per KV-head channel."""
    for linear in linears:
        replace_data(linear.weight, linear.weight * s.to(linear.weight)[None, :])
    if isinstance(prev, torch.nn.Linear):
        rows = s.reshape(-1, n_rep, head_dim)[:, 0].reshape(-1) if n_rep > 1 else s
        replace_data(prev.weight, prev.weight / rows.to(prev.weight)[:, None])
        if prev.bias is not None:
            replace_data(prev.bias, prev.bias / rows.to(prev.bias))
    else:
        replace_data(prev.weight, prev.weight / s.to(prev.weight))


@dataclass
class AWQReport(QuantReport):
    """A QuantReport (`errors`: each linear's relative output error tr(ΔHΔᵀ) / tr(WHWᵀ) on the calibration
    inputs) with the search's results, per group ('layers.3.input_layernorm'): the chosen α, the loss of
    every α tried, and the activation scale s_X of the group's input (on the CPU)."""

    alphas: dict[str, float] = field(default_factory=dict)
    act_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # s_X = mean |X_j| [in] of each group's input
    losses: dict[str, list[float]] = field(default_factory=dict)
    clip: bool = True


def _check_grid(n_grid) -> int:
    n_grid = check_count(n_grid, "n_grid", 20)
    if n_grid < 2:
        raise ValueError(f"n_grid={n_grid}: need at least 2 values of alpha (0 is plain round-to-nearest), e.g. 20.")
    return n_grid


@torch.no_grad()
@all_or_nothing
def awq(
    model,
    calibration: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    clip: bool = True,
    device=None,
    batch_size: int = 8,
    loss=None,
) -> AWQReport:
    """AWQ on every decoder linear of `model`, in place, layer by layer on the shared calibration walk.

    calibration: LongTensor [n_samples, seqlen] (labkit.data.calibration). In each layer: observe the inputs of
    the four groups (AWQ_GROUPS), search α and fold s for each group, then (clip=True) search each linear's
    clipping range but q's and k's, then quantize every linear round-to-nearest (asymmetric integer grid,
    `bits`, `group_size`) into a QuantLinear. loss: None (scaled_error) or your own loss(W, H, s, bits,
    group_size) -> float with scaled_error's contract (the lesson's "build it"); a loss that is not a finite
    number raises ValueError, the model unchanged."""
    check_model(model, "quant.awq")
    group_size = check_model_settings(model, bits, group_size)
    n_grid = _check_grid(n_grid)
    if not isinstance(clip, bool):
        raise ValueError(f"clip={clip!r}: True (search each linear's clipping range) or False.")
    if loss is not None and not callable(loss):
        raise ValueError(f"loss={loss!r}: pass a function loss(W, H, s, bits, group_size) -> float, or None.")
    walk.check_calibration(calibration, model)
    check_count(batch_size, "batch_size")
    config = model.config
    n_rep = config.num_attention_heads // config.num_key_value_heads
    head_dim = models.head_dim(config)
    checked = _checked_loss(loss) if loss is not None else None
    report = AWQReport("AWQ", bits, group_size, sym=False, clip=clip)
    start = time.perf_counter()
    watched = {names[0]: prev for prev, names in AWQ_GROUPS.items()}  # one statistic per group, on its first linear

    def make_stats(name, linear):
        return AWQStats(linear.in_features, device=linear.weight.device) if name in watched else None

    def update(index, layer, stats):
        hessians = {}
        for prev_name, names in AWQ_GROUPS.items():
            stat = stats[names[0]]
            H, mean_abs = stat.hessian.H, stat.mean_abs
            if not (torch.isfinite(H).all() and torch.isfinite(mean_abs).all()):
                raise ValueError(
                    f"the calibration activations entering layers.{index}.{names[0]} hold NaN or inf: AWQ needs "
                    "finite inputs. The model is left unchanged."
                )
            rep = n_rep if prev_name == "self_attn.v_proj" else 1
            if rep > 1:
                mean_abs = shared_by_kv_heads(mean_abs, rep, head_dim)
            linears = [layer.get_submodule(n) for n in names]
            s, alpha, losses = search_scale(
                [lin.weight for lin in linears], H, mean_abs, bits, group_size, n_grid, checked
            )
            fold_scale(layer.get_submodule(prev_name), linears, s, rep, head_dim)
            key = f"layers.{index}.{prev_name}"
            report.alphas[key], report.losses[key], report.act_scales[key] = alpha, losses, stat.mean_abs.cpu()
            Hs = H / s[:, None] / s[None, :]  # the input is now X diag(s)⁻¹
            hessians.update({n: Hs for n in names})
        for name, H in hessians.items():
            linear = layer.get_submodule(name)
            w = linear.weight.data
            if clip and name not in NOT_CLIPPED:
                max_val = search_clip(w, H, bits, group_size, n_grid)
                bound = max_val.repeat_interleave(group_size or w.shape[1], 1).to(w)
                w = torch.maximum(torch.minimum(w, bound), -bound)
            codes, scales, zeros = labkit_quantize(w, bits, group_size)
            packed = QuantLinear.replacing(linear, codes, scales, zeros, bits, group_size)
            delta = packed.dequantized_weight(torch.float32) - linear.weight.float()
            report.errors[f"layers.{index}.{name}"] = (
                ((delta @ H) * delta).sum()
                / ((linear.weight.float() @ H) * linear.weight.float()).sum().clamp(min=1e-30)
            ).item()
            set_module(layer, name, packed)
            report.layers += 1
            report.params += w.numel()

    walk.calibration_walk(model, calibration, make_stats, update, device=device, batch_size=batch_size, desc="AWQ")
    report.seconds = time.perf_counter() - start
    record(model, "AWQ", report.setting + ("" if clip else " no-clip"), "quantize")
    return report


def _checked_loss(loss):
    """A learner's loss, called on copies, whose answer must be a finite number."""

    def checked(W, H, s, bits, group_size):
        value = loss(W.detach().clone(), H.clone(), s.clone(), bits, group_size)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or abs(value) == float("inf")
        ):
            raise ValueError(
                f"loss returned {value!r}; it must return one finite number, the output error of quantizing W with "
                "scales s. The model is unchanged."
            )
        return float(value)

    return checked
