"""Masks shared by every pruning method: which weights to zero, given a score per weight.

Convention: a mask is a bool tensor shaped like the weight, True where the weight is PRUNED
(set to zero), as in the SparseGPT and Wanda reference code. Lower score = pruned first.

Patterns:
    "unstructured"  any weights may go; the count pruned is round(sparsity · n) over the
                    compared set (a row, a matrix, or all matrices).
    "N:M"           e.g. "2:4": in every group of M consecutive input weights of a row, the N
                    highest-scoring weights are KEPT (NVIDIA's semi-structured sparsity);
                    the sparsity is 1 − N/M.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import check_llama
from ..transform import check_model, record

SCOPES = ("layer", "row", "global")


# --- arguments ---------------------------------------------------------------------------------


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for an "N:M" string (N weights kept per group of M)."""
    if pattern == "unstructured":
        return None
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if found is None:
        raise ValueError(
            f"pattern={pattern!r}: allowed are 'unstructured' or 'N:M' with integers "
            f"1 <= N < M, e.g. '2:4' (keep 2 of every 4 consecutive weights)."
        )
    n, m = int(found[1]), int(found[2])
    if not 1 <= n < m:
        raise ValueError(
            f"pattern={pattern!r}: N:M needs 1 <= N < M (N weights kept in each group of M); got N={n}, M={m}."
        )
    return n, m


def check_sparsity(sparsity: float | None, pattern: str) -> tuple[float, tuple[int, int] | None]:
    """Validate (sparsity, pattern); returns (the sparsity, (N, M) or None).

    With an N:M pattern the sparsity is fixed at 1 − N/M: pass None or exactly that value."""
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise ValueError(
                f"sparsity={sparsity!r} contradicts pattern={pattern!r}, which fixes the sparsity "
                f"at 1 - {nm[0]}/{nm[1]} = {implied:g}. Pass sparsity=None or {implied:g}."
            )
        return implied, nm
    if sparsity is None:
        raise ValueError("sparsity=None: unstructured pruning needs a sparsity in [0, 1), e.g. 0.5.")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity={sparsity!r}: allowed is a number in [0, 1) "
            f"(the fraction of weights set to zero; 1 would remove every weight)."
        )
    return float(sparsity), None


def check_divisible(linears: dict[str, nn.Linear], nm: tuple[int, int] | None) -> None:
    """N:M groups run along the input dimension: every in_features must be a multiple of M."""
    if nm is None:
        return
    bad = {name: lin.in_features for name, lin in linears.items() if lin.in_features % nm[1]}
    if bad:
        raise ValueError(
            f"pattern '{nm[0]}:{nm[1]}' needs in_features divisible by M={nm[1]}; these linears are not: {bad}."
        )


def n_pruned(sparsity: float, count: int) -> int:
    """How many of `count` weights are pruned at `sparsity`: round(sparsity · count)."""
    return min(count, round(sparsity * count))


# --- masks -------------------------------------------------------------------------------------


def lowest_mask(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """True at the k lowest scores over all tensors together (one threshold), exactly k of them.

    scores: tensors of any shapes. Ties at the threshold (common: these weights were 4-bit
    before) are broken in order, so the count is exact.
    """
    return list(lowest_masks(scores, k))


def lowest_masks(tensors: list[torch.Tensor], k: int, score=None):
    """lowest_mask one tensor at a time: yields each tensor's mask, True at the k lowest scores of all
    tensors together, with ties at the threshold broken in order (tensor by tensor, then flat index).

    score: an elementwise function giving a tensor's scores (default: the values themselves), e.g.
    torch.abs; applied when a tensor's turn comes, so only one tensor's scores exist at a time (global magnitude at 7B).
    A tensor's mask is made when it is asked for, from the tensor as it is then.
    """
    if k <= 0:
        for t in tensors:
            yield torch.zeros_like(t, dtype=torch.bool)
        return
    threshold, below = kth_lowest(tensors, k, score)
    ties = k - below  # scores equal to the threshold still to prune
    for t in tensors:
        s = (score(t) if score is not None else t).float()
        mask = s < threshold
        if ties > 0:
            tied = (s == threshold).flatten().nonzero().squeeze(1)[:ties]
            mask.view(-1)[tied] = True
            ties -= tied.numel()
        yield mask


_RADIX_BITS = 16  # kth_lowest: two passes, each ranking 16 of the fp32 order key's 32 bits
_CHUNK = 2**22  # kth_lowest scores this many elements at a time (~100 MB of fp32 and int64 temporaries)


def kth_lowest(tensors: list[torch.Tensor], k: int, score=None) -> tuple[torch.Tensor, int]:
    """(value, below): the k-th lowest score of all `tensors` together, compared in fp32 (a 0-dim fp32
    tensor), and how many scores are strictly lower. 1 <= k <= the number of elements; scores finite.

    The value is torch.cat([score(t).flatten().float() for t in tensors]).kthvalue(k), found without the
    concatenation: a radix select. Each score's fp32 bits, as an integer key, sort like the scores; one
    pass counts the scores per value of the key's top 16 bits and finds the bucket holding the k-th, a
    second counts that bucket's scores per value of the low 16 bits. Counting is exact, so the value is
    too (and equal scores stay equal: ties are left to the caller). A single tensor without `score` uses
    kthvalue directly. score: as in lowest_masks, applied to chunks of a tensor's flattened elements.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k!r}: need 1 <= k <= {total} (the number of scores).")
    if len(tensors) == 1 and score is None:
        s = tensors[0].flatten().float()
        value = s.kthvalue(k).values
        return value, int((s < value).sum())
    score = score or (lambda t: t)
    bins = 2**_RADIX_BITS
    prefix, below, rank = 0, 0, k  # rank: the wanted score's rank among those left (1-based)
    for high in (True, False):
        counts = torch.zeros(bins, dtype=torch.long)
        for t in tensors:
            on_device = torch.zeros(bins, dtype=torch.long, device=t.device)
            flat = t.detach().flatten()
            for start in range(0, flat.numel(), _CHUNK):
                keys = _order_keys(score(flat[start : start + _CHUNK]))  # [chunk] int64 in [0, 2^32)
                if high:
                    on_device.index_add_(0, keys >> _RADIX_BITS, torch.ones_like(keys))
                else:  # count only the keys in the chosen top bucket
                    in_bucket = (keys >> _RADIX_BITS == prefix).long()
                    on_device.index_add_(0, keys & (bins - 1), in_bucket)
            counts += on_device.cpu()
        cumulative = counts.cumsum(0)
        bucket = int((cumulative < rank).sum())  # the first bucket whose cumulative count reaches rank
        skipped = int(cumulative[bucket - 1]) if bucket > 0 else 0
        below, rank = below + skipped, rank - skipped
        prefix = (prefix << _RADIX_BITS) | bucket
    return _from_order_key(prefix), below


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) in the order of the fp32 `values` (finite; -0.0 gets 0.0's key). values: [n]"""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # negatives: larger magnitude, smaller key


def _from_order_key(key: int) -> torch.Tensor:
    """The fp32 value (a 0-dim tensor) whose order key is `key`: _order_keys inverted."""
    bits = key - 2**31
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the round(sparsity · in_features) lowest scores of each row (Wanda's comparison group).

    scores: [out_features, in_features]
    """
    k = n_pruned(sparsity, scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # [out_features, k]
    return mask.scatter_(1, lowest, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the M − N lowest scores of every group of M consecutive columns: N kept per group.

    scores: [out_features, in_features], in_features divisible by m.
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # [out, groups, m]
    lowest = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def nm_fraction(weight: torch.Tensor, n: int, m: int) -> float:
    """Fraction of groups of m consecutive inputs (per row) holding at most n nonzeros: 1.0 = a valid N:M matrix.

    weight: [out_features, in_features], in_features divisible by m."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not divisible by m={m}.")
    nonzero = (weight.detach() != 0).reshape(rows, cols // m, m).sum(-1)
    return float((nonzero <= n).float().mean())


def mask_for(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str = "layer") -> torch.Tensor:
    """The prune mask of one matrix: N:M groups, per row, or over the whole matrix ('layer')."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if scope == "row":
        return row_mask(scores, sparsity)
    return lowest_mask([scores], n_pruned(sparsity, scores.numel()))[0]


# --- which linears, and how sparse they are ---------------------------------------------------


def decoder_linears(model) -> dict[str, nn.Module]:
    """The prunable matrices: every nn.Linear of every decoder layer, or the stored sparse matrix that
    replaced it (a module with dense_weight(), i.e. a prune.SparseLinear), by name like
    'layers.3.mlp.down_proj'. Embeddings, lm_head and norms are never pruned."""
    check_llama(model, "labkit.prune")
    found = {}
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or callable(getattr(module, "dense_weight", None)):
                found[f"layers.{index}.{name}"] = module
    return found


@dataclass
class SparsityReport:
    per_linear: dict[str, float]  # name -> fraction of zero weights
    zeros: int
    total: int

    @property
    def overall(self) -> float:
        return self.zeros / max(self.total, 1)


@dataclass
class PruneReport:
    method: str  # "magnitude", "wanda", "sparsegpt"
    pattern: str  # "unstructured" or "N:M"
    target: float  # requested sparsity
    seconds: float  # wall time of the compression (calibration walk included)
    per_linear: dict[str, float] = field(repr=False)  # achieved fraction of zeros per decoder linear
    overall: float = 0.0  # achieved fraction of zeros over all decoder linears


def sparsity_report(model) -> SparsityReport:
    """Fraction of zeros in each decoder linear's weight, and overall (embeddings/lm_head excluded)."""
    per_linear, zeros, total = {}, 0, 0
    for name, module in decoder_linears(model).items():
        weight = module.dense_weight() if not isinstance(module, nn.Linear) else module.weight
        z = int((weight == 0).sum())
        per_linear[name] = z / weight.numel()
        zeros, total = zeros + z, total + weight.numel()
    return SparsityReport(per_linear, zeros, total)


def report(method: str, pattern: str, target: float, seconds: float, model) -> PruneReport:
    measured = sparsity_report(model)
    return PruneReport(method, pattern, target, seconds, measured.per_linear, measured.overall)


def check_pruneable(model, where: str) -> None:
    """Before pruning changes anything: a Llama with real, finite weights that was not quantized."""
    check_model(model, where, after=("quantize",))


def record_prune(model, method: str, pattern: str, sparsity: float) -> None:
    """Label the model (labkit.transform.history): e.g. 'wanda 50%' or 'sparsegpt 2:4'."""
    record(model, method, pattern if pattern != "unstructured" else f"{sparsity:.0%}", "prune")


def weight_linears(model) -> dict[str, nn.Linear]:
    """decoder_linears restricted to plain nn.Linear (what the pruning methods change)."""
    linears = {name: m for name, m in decoder_linears(model).items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(
            "the model has no nn.Linear in its decoder layers left to prune "
            "(was it already converted with labkit.prune.to_sparse?)."
        )
    return linears


__all__ = [
    "SCOPES",
    "PruneReport",
    "SparsityReport",
    "check_divisible",
    "check_sparsity",
    "decoder_linears",
    "kth_lowest",
    "lowest_mask",
    "lowest_masks",
    "mask_for",
    "n_pruned",
    "nm_mask",
    "parse_pattern",
    "row_mask",
    "sparsity_report",
    "weight_linears",
]
