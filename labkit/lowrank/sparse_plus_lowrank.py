"""Low rank plus sparse: W ≈ B A + S (the LoSparse idea, Li et al., 2023).

A low-rank matrix captures the directions shared by many neurons (the top of the spectrum);
what it misses is often concentrated in a few large entries, which a sparse matrix S stores
cheaply. LoSparse initialises B A by truncated SVD and S from the residual W − B A, then prunes S
iteratively, in structured units, during fine-tuning. Here the decomposition is one-shot and S
is unstructured: it keeps the k largest-magnitude entries of the residual.

    decompose(W, rank, density, iters)
        B A = trunc_r(W − S)              # best rank r given S (Eckart–Young), S = 0 at first
        S   = top-k |W − B A|             # best k-sparse given B A: keep the largest residuals
    repeated `iters` times: each half-step is an exact minimisation of ‖W − B A − S‖_F over one
    part, so the error never increases (alternating projections, as in GoDec).

Storage is counted honestly: S is kept as its k values plus one int32 flat index (row · in +
column) each, so an entry of S costs value bytes + 4; in fp16 an entry of S costs three times
a dense weight. SparsePlusLowRankLinear.stored_bytes() reports A, B, the values and the indices.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..evaluate import tensor_bytes
from ..models import set_module
from ..transform import all_or_nothing, check_model, record
from .svd import LowRankLinear, check_rank, factor_targets, rank_for_ratio, truncated_svd


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 <= density < 1:
        raise ValueError(
            f"density={density!r}: need the fraction of W's entries kept in the sparse part, in [0, 1) (e.g. 0.01)."
        )
    return float(density)


def decompose(weight: torch.Tensor, rank: int, density: float, iters: int = 1):
    """W ≈ B A + S. weight: [out, in] -> (A [r, in], B [out, r], values [k], index [k] int32 flat
    positions of S's entries), fp32, k = round(density · out · in)."""
    density = check_density(density)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r}: need a positive number of alternating steps.")
    W = weight.detach().float()  # [out, in]
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= min(W.shape):
        raise ValueError(
            f"rank={rank!r} for a {W.shape[0]} x {W.shape[1]} matrix: need an integer in [1, {min(W.shape)}]."
        )
    k = round(density * W.numel())
    S = torch.zeros_like(W)
    for _ in range(iters):
        A, B, _ = truncated_svd(W - S, rank)  # best rank r given S
        residual = (W - B @ A).flatten()
        index = torch.topk(residual.abs(), k).indices  # best k-sparse given B A
        S = torch.zeros_like(residual).scatter(0, index, residual[index]).view_as(W)
    return A, B, residual[index], index.to(torch.int32)


class SparsePlusLowRankLinear(nn.Module):
    """y = B (A x) + S x + bias, with S stored as `values` [k] at flat positions `index` [k] (int32)."""

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype=None,
    ):
        super().__init__()
        dtype = dtype or A.dtype
        self.lowrank = LowRankLinear.from_factors(A, B, bias, dtype=dtype)
        self.in_features, self.out_features = A.shape[1], B.shape[0]
        self.values = nn.Parameter(values.detach().to(dtype).clone())  # [k]
        self.register_buffer("index", index.to(torch.int32).clone())  # [k], row · in + column

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, density: float, iters: int = 1) -> SparsePlusLowRankLinear:
        A, B, values, index = decompose(linear.weight, rank, density, iters)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(A, B, values, index, bias, dtype=linear.weight.dtype)

    def sparse_weight(self) -> torch.Tensor:  # [out, in], zero except the k stored entries
        dense = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter(0, self.index.long(), self.values).view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:  # [out, in]: B A + S, the dense matrix this layer computes
        return self.lowrank.weight + self.sparse_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.lowrank(x) + F.linear(x, self.sparse_weight())  # dense S: exact, not fast

    def n_params(self) -> int:
        """Stored numbers: A, B, bias and the sparse values (the indices are not parameters, but cost bytes)."""
        return sum(p.numel() for p in self.parameters())

    def stored_bytes(self) -> int:
        """A, B, bias and S's values at their dtype, plus 4 bytes per int32 index."""
        return sum(tensor_bytes(p) for p in self.parameters()) + tensor_bytes(self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


@dataclass
class SparseLowRankReport:
    layers: dict[str, dict] = field(repr=False)  # name -> {rank, nnz, bytes_before, bytes_after, error}
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def kept(self) -> float:  # fraction of the linears' bytes that remain
        return self.bytes_after / max(self.bytes_before, 1)


@torch.no_grad()
@all_or_nothing
def sparse_plus_lowrank(
    model,
    rank: int | None = None,
    param_ratio: float | None = None,
    density: float = 0.01,
    iters: int = 1,
    targets=None,
) -> SparseLowRankReport:
    """Replace decoder linears by SparsePlusLowRankLinear in place (weights only, no calibration).

    rank or param_ratio (exactly one) sizes the low-rank part as in labkit.lowrank.svd; density is
    the fraction of each W's entries kept in S. error: ‖W − B A − S‖²_F / ‖W‖²_F per linear.
    """
    if (rank is None) == (param_ratio is None):
        raise ValueError("give exactly one of rank, param_ratio for the low-rank part.")
    if param_ratio is not None and (
        isinstance(param_ratio, bool) or not isinstance(param_ratio, numbers.Real) or not 0 < param_ratio < 1
    ):
        raise ValueError(f"param_ratio={param_ratio!r}: need a fraction in (0, 1).")
    check_density(density)
    check_model(model, "lowrank.sparse_plus_lowrank")
    linears = factor_targets(model, targets)
    layers = {}
    for name, linear in linears.items():
        r = (
            check_rank(rank, name, linear)
            if rank is not None
            else rank_for_ratio(linear.in_features, linear.out_features, param_ratio)
        )
        module = SparsePlusLowRankLinear.from_linear(linear, r, density, iters)
        W = linear.weight.float()
        error = float(((W - module.weight.float()) ** 2).sum() / (W**2).sum().clamp_min(1e-30))
        before = sum(tensor_bytes(p) for p in linear.parameters())
        layers[name] = dict(
            rank=r, nnz=module.values.numel(), bytes_before=before, bytes_after=module.stored_bytes(), error=error
        )
        set_module(model.model.layers, name.removeprefix("layers."), module)
    report = SparseLowRankReport(
        layers, sum(v["bytes_before"] for v in layers.values()), sum(v["bytes_after"] for v in layers.values())
    )
    record(model, "sparse + low-rank", f"density {density:g}", "lowrank")
    return report


__all__ = ["SparseLowRankReport", "SparsePlusLowRankLinear", "check_density", "decompose", "sparse_plus_lowrank"]
