"""Structured pruning, the surgery: remove whole attention heads and MLP channels for real.

Unstructured zeros leave every matrix its full size. Removing a *structure* (an attention head,
an MLP channel) deletes rows and columns, so the model becomes a smaller dense model that every
matmul library runs faster. What belongs together in a Llama decoder layer:

    attention head h (query)   rows h·d..(h+1)·d of q_proj  and  the same columns of o_proj
    KV head g                  rows g·d..(g+1)·d of k_proj and v_proj
    MLP channel c              row c of gate_proj and up_proj, and column c of down_proj

Grouped-query attention (GQA): query head h reads KV head h // group, where
group = n_query_heads / n_kv_heads (transformers' repeat_kv). The surgery takes the query heads
to KEEP; a KV head is kept exactly when one of its query heads is, and every kept KV head must
keep the same number of query heads, because transformers expands each KV head to a fixed
`num_key_value_groups` query heads. So two kinds of cut are allowed:
    - whole KV groups: a KV head with all the query heads that share it (what flap and
      llm_pruner remove: on SmolLM2-135M a group is 3 query heads + 1 K head + 1 V head);
    - the same number of query heads from every group (the KV heads all stay).
Anything else (say, one query head of one group) raises ValueError. transformers 5.x's
LlamaAttention reshapes with -1 heads, so a layer runs with its own head count once the
module's `num_key_value_groups` is set; the model's config keeps the original (global) counts.

Bias compensation (FLaP): removing input channels R of an output projection (o_proj, down_proj)
drops W[:, R] x[R] from its output. Replacing x[R] by its mean over calibration tokens keeps
the average part of it:  b = W[:, R] · mean(x[R])  becomes the layer's bias.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import check_llama, parameter_count, set_module

# --- arguments --------------------------------------------------------------------------------


def check_ratio(ratio, name: str = "ratio") -> float:
    """A pruning ratio must be a number in [0, 1): the fraction removed (1 would remove everything)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ValueError(
            f"{name}={ratio!r}: allowed is a number in [0, 1), the fraction of parameters "
            f"removed (0 removes nothing; 1 would remove every head and channel)."
        )
    return float(ratio)


def _indices(keep, total: int, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0:
        raise ValueError(
            f"keeping no {what} of {total} would remove every one of them; keep at least one "
            f"(a layer needs at least one attention head and one MLP channel)."
        )
    if keep.min() < 0 or keep.max() >= total or keep.unique().numel() != keep.numel():
        raise ValueError(f"{what} to keep must be distinct indices in [0, {total}); got {keep.tolist()}.")
    return keep.sort().values


# --- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:  # query heads per KV head
        return self.n_heads // self.n_kv_heads


def attention_shape(attn: nn.Module) -> AttentionShape:
    """Head counts of one LlamaAttention, read from its (possibly already pruned) weights."""
    d = attn.head_dim
    return AttentionShape(attn.q_proj.out_features // d, attn.k_proj.out_features // d, d)


def head_channels(heads, head_dim: int) -> torch.Tensor:
    """Channels of heads: rows of q_proj (k/v_proj for KV heads) and columns of o_proj.

    heads: [n] head indices -> [n · head_dim], head h owning h·d, ..., h·d + d − 1."""
    heads = torch.as_tensor(heads, dtype=torch.long).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def group_heads(kv_heads, group: int) -> torch.Tensor:
    """Query heads that read KV heads `kv_heads`: g·group, ..., g·group + group − 1 (repeat_kv)."""
    kv_heads = torch.as_tensor(kv_heads, dtype=torch.long).flatten()
    return (kv_heads[:, None] * group + torch.arange(group)[None, :]).flatten()


def group_param_count(attn: nn.Module) -> int:
    """Weights removed with one whole KV group: q rows and o columns of its query heads, k and v rows."""
    s = attention_shape(attn)
    hidden = attn.q_proj.in_features
    return (2 * s.group + 2) * s.head_dim * hidden


def channel_param_count(mlp: nn.Module) -> int:
    """Weights removed with one MLP channel: a row of gate_proj and up_proj, a column of down_proj."""
    return mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features


# --- the surgery ------------------------------------------------------------------------------


def _shrink(
    linear: nn.Linear,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
) -> nn.Linear:
    """A new nn.Linear with weight[rows][:, cols] (None = all) and bias (+ extra_bias, [out_kept])."""
    W = linear.weight.detach()  # [out, in]
    if rows is not None:
        W = W[rows.to(W.device)]
    if cols is not None:
        W = W[:, cols.to(W.device)]
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows.to(bias.device)]
    if extra_bias is not None:
        bias = extra_bias.to(W.dtype) if bias is None else bias + extra_bias.to(bias.dtype)
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def compensation(weight: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLaP's baseline bias: the average contribution of the removed input channels.

    weight: [out, in]; removed: [k] input channels; mean: [in], mean input over calibration tokens
    -> [out]:  b = W[:, removed] @ mean[removed]."""
    removed = removed.to(weight.device)
    return weight.detach()[:, removed].float() @ mean.to(weight.device).float()[removed]


@torch.no_grad()
def prune_heads(attn: nn.Module, keep_heads, mean: torch.Tensor | None = None) -> None:
    """Keep only query heads `keep_heads` of a LlamaAttention (and the KV heads they read), in place.

    mean: optional [n_heads · head_dim] mean of o_proj's input over calibration tokens; when given,
    o_proj gets the bias that compensates the removed heads' average output.
    """
    s = attention_shape(attn)
    keep = _indices(keep_heads, s.n_heads, "attention heads")
    kv_of = keep // s.group  # KV head each kept query head reads
    keep_kv, per_kv = torch.unique(kv_of, return_counts=True)
    if per_kv.unique().numel() != 1:
        raise ValueError(
            f"keep_heads={keep.tolist()} keeps {dict(zip(keep_kv.tolist(), per_kv.tolist()))} query heads per "
            f"KV head; with grouped-query attention ({s.n_heads} query heads share {s.n_kv_heads} KV heads, "
            f"{s.group} each) every kept KV head must keep the same number of query heads. Allowed: whole "
            f"groups (labkit.prune.group_heads) or the same count from every group."
        )
    if mean is not None and mean.numel() != s.n_heads * s.head_dim:
        raise ValueError(f"mean has {mean.numel()} entries; o_proj has {s.n_heads * s.head_dim} input channels.")
    if keep.numel() == s.n_heads:
        return
    q_rows = head_channels(keep, s.head_dim)
    kv_rows = head_channels(keep_kv, s.head_dim)
    extra = None
    if mean is not None:
        removed = torch.ones(s.n_heads * s.head_dim, dtype=torch.bool)
        removed[q_rows] = False
        extra = compensation(attn.o_proj.weight, removed.nonzero().squeeze(1), mean)
    set_module(attn, "q_proj", _shrink(attn.q_proj, rows=q_rows))
    set_module(attn, "k_proj", _shrink(attn.k_proj, rows=kv_rows))
    set_module(attn, "v_proj", _shrink(attn.v_proj, rows=kv_rows))
    set_module(attn, "o_proj", _shrink(attn.o_proj, cols=q_rows, extra_bias=extra))
    attn.num_key_value_groups = int(per_kv[0])  # read by transformers' eager and SDPA attention


@torch.no_grad()
def prune_channels(mlp: nn.Module, keep_channels, mean: torch.Tensor | None = None) -> None:
    """Keep only channels `keep_channels` of a LlamaMLP (gate/up rows, down columns), in place.

    mean: optional [intermediate] mean of down_proj's input over calibration tokens; when given,
    down_proj gets the bias that compensates the removed channels' average output.
    """
    total = mlp.down_proj.in_features
    keep = _indices(keep_channels, total, "MLP channels")
    if mean is not None and mean.numel() != total:
        raise ValueError(f"mean has {mean.numel()} entries; down_proj has {total} input channels.")
    if keep.numel() == total:
        return
    extra = None
    if mean is not None:
        removed = torch.ones(total, dtype=torch.bool)
        removed[keep] = False
        extra = compensation(mlp.down_proj.weight, removed.nonzero().squeeze(1), mean)
    set_module(mlp, "gate_proj", _shrink(mlp.gate_proj, rows=keep))
    set_module(mlp, "up_proj", _shrink(mlp.up_proj, rows=keep))
    set_module(mlp, "down_proj", _shrink(mlp.down_proj, cols=keep, extra_bias=extra))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def keep_lowest_removed(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices to keep when the n_remove lowest scores go (ties broken by position): [n − n_remove]."""
    order = torch.sort(scores.float().cpu(), stable=True).indices
    return order[n_remove:].sort().values


# --- what the model looks like now ------------------------------------------------------------


@dataclass
class LayerStructure:
    heads: int  # query heads kept
    kv_heads: int
    channels: int  # MLP channels kept


def structure(model) -> list[LayerStructure]:
    """Heads, KV heads and MLP channels of every decoder layer, read from the weights."""
    check_llama(model, "labkit.prune.structure")
    found = []
    for layer in model.model.layers:
        s = attention_shape(layer.self_attn)
        found.append(LayerStructure(s.n_heads, s.n_kv_heads, layer.mlp.down_proj.in_features))
    return found


def layer_param_count(layer: nn.Module) -> int:
    """Weights and biases of the nn.Linear modules of one decoder layer."""
    return sum(p.numel() for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


def linear_param_count(model) -> int:
    """Weights and biases of every decoder nn.Linear (what structured pruning shrinks)."""
    return sum(layer_param_count(layer) for layer in model.model.layers)


@dataclass
class StructuredReport:
    method: str  # "flap", "llm_pruner", ...
    ratio: float  # requested fraction of decoder-linear parameters removed
    params_before: int  # whole model (tied embedding counted once)
    params_after: int
    linear_params_before: int  # decoder linears only, biases included
    linear_params_after: int
    layers_before: list[LayerStructure] = field(repr=False)
    layers_after: list[LayerStructure] = field(repr=False)
    seconds: float = 0.0  # wall time of scoring and surgery (recovery excluded)
    bias_compensation: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # method-specific details

    @property
    def removed(self) -> float:
        """Fraction of the whole model's parameters removed."""
        return 1 - self.params_after / self.params_before

    @property
    def linear_removed(self) -> float:
        """Fraction of the decoder linears' parameters removed (what `ratio` asks for)."""
        return 1 - self.linear_params_after / self.linear_params_before

    def table(self) -> str:
        """One line per decoder layer: query/KV heads and MLP channels kept, of how many."""
        lines = ["layer  heads (q/kv)   MLP channels"]
        for i, (b, a) in enumerate(zip(self.layers_before, self.layers_after)):
            lines.append(
                f"{i:5d}  {a.heads:2d}/{a.kv_heads:<2d} of {b.heads:2d}/{b.kv_heads:<2d}  "
                f"{a.channels:5d} of {b.channels}"
            )
        return "\n".join(lines)


def begin(model) -> tuple[int, int, list[LayerStructure]]:
    """The 'before' half of a report."""
    check_llama(model, "labkit.prune (structured)")
    return parameter_count(model), linear_param_count(model), structure(model)


def finish(method: str, ratio: float, before, model, seconds: float, bias: bool, **extra) -> StructuredReport:
    params, linear, layers = before
    return StructuredReport(
        method,
        ratio,
        params,
        parameter_count(model),
        linear,
        linear_param_count(model),
        layers,
        structure(model),
        seconds,
        bias,
        extra,
    )


def prune_layer(
    layer: nn.Module,
    keep_heads=None,
    keep_channels=None,
    attn_mean: torch.Tensor | None = None,
    mlp_mean: torch.Tensor | None = None,
) -> None:
    """Both halves of one decoder layer; None leaves that half whole."""
    if keep_heads is not None:
        prune_heads(layer.self_attn, keep_heads, attn_mean)
    if keep_channels is not None:
        prune_channels(layer.mlp, keep_channels, mlp_mean)


def check_layers(model, layers: Sequence[int] | None) -> list[int]:
    n = len(model.model.layers)
    if layers is None:
        return list(range(n))
    layers = list(layers)
    if (
        not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ValueError(f"layers={layers!r}: need distinct decoder-layer indices in [0, {n}).")
    return sorted(layers)


__all__ = [
    "AttentionShape",
    "LayerStructure",
    "StructuredReport",
    "attention_shape",
    "channel_param_count",
    "check_layers",
    "check_ratio",
    "compensation",
    "group_heads",
    "group_param_count",
    "head_channels",
    "keep_lowest_removed",
    "layer_param_count",
    "linear_param_count",
    "prune_channels",
    "prune_heads",
    "prune_layer",
    "structure",
]
