"""Low-rank factorization of the decoder linears: truncated SVD, plain and activation-aware (SVD-LLM).

A linear y = W x with W: [out, in] is replaced by two thin ones, y = B (A x) with A: [r, in] and
B: [out, r]. That stores r · (in + out) weights instead of in · out, a real saving when
r < in · out / (in + out) (the break-even rank: 288 for a 576 × 576 matrix), and the two
products cost r · (in + out) multiply-adds per token instead of in · out.

Plain SVD (Eckart–Young): the best rank-r approximation of W in Frobenius norm is the truncated
SVD W_r = U_r Σ_r V_rᵀ, with error ‖W − W_r‖²_F = Σ_{i>r} σ_i². That minimises the WEIGHT error,
and treats every input direction alike.

Activation-aware (SVD-LLM, Wang et al., 2024): what matters is the OUTPUT error on real inputs
X: [in, tokens]. With the whitening matrix S = cholesky(X Xᵀ) (lower triangular, S Sᵀ = X Xᵀ),

    ‖W X − W' X‖²_F = tr((W − W') X Xᵀ (W − W')ᵀ) = ‖(W − W') S‖²_F = ‖W S − Z‖²_F,   Z = W' S.

So minimising the output error over rank-r W' is Eckart–Young on W S: Z = trunc_r(W S), i.e.
W' = U_r Σ_r V_rᵀ S⁻¹ (SVD of W S = U Σ Vᵀ), and the output error is exactly Σ_{i>r} σ_i(W S)²:
each discarded singular value of the whitened matrix costs its square in output error (the
SVD-LLM paper's truncation-aware whitening result). Plain SVD discards small singular values of W
even when they act on input directions with huge activations (the outlier channels of LLMs), which
is why it destroys SmolLM2 at 20% parameter removal while the whitened version does not.

The activation-aware version runs on labkit.walk.calibration_walk: the statistics X Xᵀ of each
layer are gathered on the outputs of the already-factored layers before it.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import check_llama, set_module
from ..transform import all_or_nothing, check_count, check_damping, check_model, record
from ..walk import SEQUENTIAL_GROUPS, Hessian, calibration_walk, check_calibration

TARGETS = tuple(name for group in SEQUENTIAL_GROUPS for name in group)  # the 7 linears of a decoder layer


class LowRankLinear(nn.Module):
    """y = B (A x) + bias, with A: nn.Linear(in, rank) and B: nn.Linear(rank, out).

    Its parameters are the thin factors, so parameter counts and labkit.evaluate.weight_bytes
    see the real saving. Being plain nn.Linears, A and B can be quantized or pruned afterwards.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # weight: [rank, in]
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # weight: [out, rank]

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None, dtype=None
    ) -> LowRankLinear:
        """A: [rank, in], B: [out, rank], bias: [out] or None."""
        rank, in_features = A.shape
        dtype = dtype or A.dtype
        module = cls(in_features, B.shape[0], rank, bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.B.bias.copy_(bias)
        return module

    @property
    def weight(self) -> torch.Tensor:  # [out, in]: the dense matrix this layer computes (for checks)
        return self.B.weight @ self.A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --- one matrix --------------------------------------------------------------------------------


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of U_r Σ_r V_rᵀ: A = √Σ_r V_rᵀ [r, in], B = U_r √Σ_r [out, r]."""
    root = s[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def linalg_svd(M: torch.Tensor, values_only: bool = False):
    """torch.linalg.svd (reduced) or svdvals of M [m, n]. On CUDA with the QR-based driver 'gesvd', and on the
    CPU if cuSOLVER still fails to converge: it did on W S of the tiny test model (H200, torch 2.11,
    2026-12-04), where LAPACK on the CPU succeeds."""
    driver = "gesvd" if M.is_cuda else None
    try:
        if values_only:
            return torch.linalg.svdvals(M, driver=driver)
        return torch.linalg.svd(M, full_matrices=False, driver=driver)
    except torch.linalg.LinAlgError:
        if not M.is_cuda:
            raise
        # cuSOLVER gave up (with 'gesvd' too, on the H200): LAPACK on the CPU, results back on the GPU
        out = linalg_svd(M.cpu(), values_only)
        return out.to(M.device) if values_only else tuple(t.to(M.device) for t in out)


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of weight [out, in] in Frobenius norm (Eckart–Young).

    Returns (A [r, in], B [out, r], singular values of W [min(out, in)]), fp32; B @ A = W_r.
    """
    U, s, Vh = linalg_svd(weight.detach().float())
    A, B = _split(U, s, Vh, rank)
    return A, B, s


def whitening(H: torch.Tensor, percdamp: float = 0.0, tries: int = 8) -> torch.Tensor:
    """S = cholesky(X Xᵀ), lower triangular, in fp64. H: [in, in] ∝ X Xᵀ (the scale does not matter).

    Inputs never active on the calibration data (H_jj = 0) get H_jj = mean(diag H). If H is not
    positive definite (fewer tokens than inputs, or rounding; or the factorization reports success with NaN
    in S, as MKL and cuSOLVER did for a singular H on the H200 machine), λ · mean(diag H) is added to the
    diagonal, λ growing tenfold from max(percdamp, 1e-8) until the factorization succeeds; with
    percdamp > 0 the dampening is always applied (a ridge term: ‖(W − W')X‖² + λ‖W − W'‖²).
    """
    H = H.detach().double().clone()
    diag = H.diagonal()
    dead = diag == 0
    mean = diag[~dead].mean() if (~dead).any() else torch.ones((), dtype=H.dtype, device=H.device)
    diag[dead] = mean
    damp = percdamp
    for _ in range(tries):
        S, info = torch.linalg.cholesky_ex(H + damp * mean * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if info == 0 and torch.isfinite(S).all():  # MKL and cuSOLVER may report success with NaN in S: H singular
            return S
        damp = max(damp * 10, 1e-8)
    raise ValueError(
        f"X Xᵀ is not positive definite even with dampening {damp / 10:g} · mean(diag): "
        f"use more calibration tokens or a larger percdamp."
    )


def whitened_svd(
    weight: torch.Tensor, H: torch.Tensor, rank: int, percdamp: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM on one matrix: the rank-r W' minimising ‖W X − W' X‖_F given H ∝ X Xᵀ.

    weight: [out, in]; H: [in, in]. Returns (A [r, in], B [out, r], singular values of W S), fp32,
    with B @ A = U_r Σ_r V_rᵀ S⁻¹; the output error is Σ_{i>r} σ_i(W S)² (times the scale of H).
    """
    return whitened_factors(weight, whitening(H.to(weight.device), percdamp), rank)


def whitened_factors(
    weight: torch.Tensor, S: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's factors given the whitening S (lower triangular, S Sᵀ ∝ X Xᵀ: `whitening`).

    weight: [out, in]; S: [in, in]. Returns (A [r, in], B [out, r], singular values of W S), fp32, with
    B @ A = U_r Σ_r V_rᵀ S⁻¹ (lesson 08's "build it" writes this function; lowrank.svd's `whitened=`).
    """
    U, s, Vh = linalg_svd(weight.detach().double() @ S)  # SVD of W S
    A, B = _split(U, s, Vh, rank)
    A = torch.linalg.solve_triangular(S, A, upper=False, left=False)  # A S⁻¹: solve X S = A
    return A.float(), B.float(), s.float()


# --- how many singular values to keep ------------------------------------------------------------


def _checked_factors(answer, linear: nn.Linear, rank: int, name: str):
    """A learner's (A [rank, in], B [out, rank], s [rank]) in fp32, or ValueError saying what is off."""
    shapes = ((rank, linear.in_features), (linear.out_features, rank), (rank,))
    if not (isinstance(answer, tuple) and len(answer) == 3 and all(isinstance(t, torch.Tensor) for t in answer)):
        raise ValueError(f"whitened returned {type(answer).__name__} for {name}; it must return (A, B, s).")
    for label, t, shape in zip(("A", "B", "s"), answer, shapes, strict=True):
        if tuple(t.shape) != shape or not torch.isfinite(t).all():
            raise ValueError(
                f"whitened returned {label} of shape {tuple(t.shape)} for {name}; expected a finite {list(shape)} "
                "tensor (A [rank, in], B [out, rank], s [rank]). The model is unchanged."
            )
    return tuple(t.float() for t in answer)


def rank_for_ratio(in_features: int, out_features: int, param_ratio: float) -> int:
    """Largest r with r · (in + out) <= param_ratio · in · out (at least 1)."""
    return max(1, math.floor(param_ratio * in_features * out_features / (in_features + out_features)))


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose top singular values hold `energy` of Σ σ_i² (of W, or of W S: output energy).
    energy = 1 keeps every singular value (full rank), however small the last ones are."""
    if energy >= 1:
        return s.numel()
    squares = s.double() ** 2
    fraction = squares.cumsum(0) / squares.sum().clamp_min(1e-300)
    return min(int((fraction < energy - 1e-12).sum()) + 1, s.numel())


def discarded(s: torch.Tensor, rank: int) -> float:
    """Σ_{i>r} σ_i² / Σ σ_i²: the relative error a rank-r truncation leaves."""
    squares = s.double() ** 2
    return float(squares[rank:].sum() / squares.sum().clamp_min(1e-300))


def truncation_errors(weight: torch.Tensor, H: torch.Tensor, ranks: list[int]) -> dict[str, list[float]]:
    """Relative errors of rank-r truncations of one linear, for each r in `ranks`, given H ∝ X Xᵀ of its inputs:

        "plain SVD: weight error"   ‖W − W_r‖² / ‖W‖²                   (W_r: the top r of W's own SVD)
        "plain SVD: output error"   tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),  ΔW = W − W_r
        "SVD-LLM: output error"     Σ_{i>r} σ_i(W S)² / Σ σ_i(W S)²      (whitened: S = cholesky(H))

    weight: [out, in]; H: [in, in]. Computed on weight's device: the plain SVD in fp32 (a 4096 × 11008
    matrix of LLaMA-7B stays on the GPU), SVD-LLM's whitening in fp64 (whitened_svd).
    """
    W = weight.detach().float()  # [out, in]
    full = min(W.shape)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full for r in ranks):
        raise ValueError(f"ranks={ranks!r}: need a non-empty list of integers in [1, {full}] (min(out, in)).")
    Hf = H.detach().to(W.device, torch.float32)  # [in, in]
    U, S, Vh = linalg_svd(W)  # U: [out, full], S: [full], Vh: [full, in]
    whitened = whitened_svd(W, H, 1)[2]  # singular values of W S
    weight_energy, out_energy = (W**2).sum(), torch.trace(W @ Hf @ W.T)
    curves: dict[str, list[float]] = {
        "plain SVD: weight error": [],
        "plain SVD: output error": [],
        "SVD-LLM: output error": [],
    }
    for r in ranks:
        dW = (U[:, r:] * S[r:]) @ Vh[r:]  # [out, in] = W − W_r: the discarded singular directions
        curves["plain SVD: weight error"].append(((dW**2).sum() / weight_energy).item())
        curves["plain SVD: output error"].append((torch.trace(dW @ Hf @ dW.T) / out_energy).item())
        curves["SVD-LLM: output error"].append(discarded(whitened, r))
    return curves


def check_choice(rank, param_ratio, energy) -> None:
    given = [name for name, v in (("rank", rank), ("param_ratio", param_ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, param_ratio, energy; got {given or 'none'}.")
    if param_ratio is not None and (
        isinstance(param_ratio, bool) or not isinstance(param_ratio, numbers.Real) or not 0 < param_ratio < 1
    ):
        raise ValueError(
            f"param_ratio={param_ratio!r}: need the fraction of each layer's parameters to keep, "
            f"in (0, 1) (0.8 removes 20%)."
        )
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0 < energy <= 1):
        raise ValueError(f"energy={energy!r}: need the fraction of Σσ² to keep, in (0, 1].")


def check_rank(rank, name: str, linear: nn.Linear) -> int:
    full = min(linear.in_features, linear.out_features)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= full:
        raise ValueError(
            f"rank={rank!r} for {name} ({linear.out_features} x {linear.in_features}): "
            f"need an integer in [1, {full}] (min(in, out))."
        )
    return int(rank)


# --- which linears -----------------------------------------------------------------------------


def factor_targets(model, targets=None) -> dict[str, nn.Linear]:
    """The nn.Linear modules to factor, by name like 'layers.3.mlp.down_proj'.

    targets: None (all 7 linears of every decoder layer, TARGETS) or names matched against
    each linear's name inside its layer ('q_proj', 'mlp.down_proj') or its full name
    ('layers.3.mlp.down_proj'). Linears already factored are not nn.Linear any more and are skipped.
    """
    check_llama(model, "labkit.lowrank")
    if isinstance(targets, str):
        targets = [targets]
    wanted = list(TARGETS if targets is None else targets)
    found, used = {}, set()
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"layers.{index}.{name}"
            hits = [t for t in wanted if t in (name, full) or name.endswith("." + t)]
            if hits and not any(isinstance(p, LowRankLinear) for p in _parents(layer, name)):
                found[full] = module
                used.update(hits)
    unused = [t for t in wanted if t not in used]
    if unused:
        raise ValueError(
            f"targets {unused} match no nn.Linear of the decoder layers (already factored?); "
            f"names look like {list(TARGETS)} or 'layers.0.mlp.down_proj'."
        )
    return found


def _parents(root: nn.Module, name: str):
    parts = name.split(".")
    return [root.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


# --- the report --------------------------------------------------------------------------------


@dataclass
class LayerRank:
    rank: int
    full_rank: int  # min(in, out)
    params_before: int  # in · out (+ bias)
    params_after: int  # rank · (in + out) (+ bias)
    discarded: float  # Σ_{i>r} σ_i² / Σ σ_i² of W (plain) or of W S (activation-aware: relative output error)


@dataclass
class LowRankReport:
    method: str  # "svd" | "svd-llm"
    seconds: float
    layers: dict[str, LayerRank] = field(repr=False)
    params_before: int = 0  # of the factored linears
    params_after: int = 0

    @property
    def kept(self) -> float:  # fraction of the factored linears' parameters that remain
        return self.params_after / max(self.params_before, 1)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}


def _params(linear: nn.Linear, rank: int | None = None) -> int:
    bias = linear.out_features if linear.bias is not None else 0
    if rank is None:
        return linear.in_features * linear.out_features + bias
    return rank * (linear.in_features + linear.out_features) + bias


# --- the model ----------------------------------------------------------------------------------


@torch.no_grad()
@all_or_nothing
def svd(
    model,
    rank: int | dict[str, int] | None = None,
    param_ratio: float | None = None,
    energy: float | None = None,
    activation_aware: bool = False,
    calibration: torch.Tensor | None = None,
    targets=None,
    percdamp: float = 0.0,
    sequential: bool = False,
    device=None,
    batch_size: int = 8,
    whitened=None,
) -> LowRankReport:
    """Replace decoder linears of `model` by LowRankLinear, in place; returns a LowRankReport.

    Exactly one of:
        rank         an int for every chosen linear, or {name: rank} (e.g. allocate_ranks(...).ranks);
                     with a dict, only the named linears are factored
        param_ratio  fraction of each linear's parameters that remain, in (0, 1): r = ⌊ratio·in·out/(in+out)⌋
        energy       fraction of Σσ² kept, in (0, 1] (of W, or of W S when activation-aware)
    activation_aware: SVD-LLM whitening with X Xᵀ from `calibration` (LongTensor [n, seqlen]),
        layer by layer on the shared calibration walk; percdamp as in `whitening`.
    targets: which linears (default: all 7 of every decoder layer; see factor_targets).
    sequential: with activation_aware, factor q/k/v, then o, then gate/up, then down inside each
        layer, each group calibrated on the outputs of the groups already factored.
    whitened: with activation_aware, None (labkit's whitened_factors) or your own
        whitened(weight [out, in], S [in, in], rank) -> (A [rank, in], B [out, rank], s) with
        whitened_factors' contract (lesson 08's "build it"); answers of another shape raise ValueError,
        the model unchanged.
    """
    check_choice(rank, param_ratio, energy)
    check_model(model, "lowrank.svd")
    linears = factor_targets(model, targets)
    if isinstance(rank, dict):
        unknown = [name for name in rank if name not in linears]
        if unknown:
            raise ValueError(
                f"rank names {unknown[:5]} are not linears to factor; names look like {list(linears)[:2]}."
            )
        linears = {name: linears[name] for name in rank}
    for name, linear in linears.items():
        if rank is not None:
            check_rank(rank[name] if isinstance(rank, dict) else rank, name, linear)
    if activation_aware and calibration is None:
        raise ValueError(
            "activation_aware=True needs calibration token ids [n_samples, seqlen]: "
            "labkit.data.calibration(tokenizer, n_samples, seqlen)."
        )
    if not activation_aware and calibration is not None:
        raise ValueError(
            "calibration is only used with activation_aware=True; pass activation_aware=True "
            "(SVD-LLM) or drop calibration (plain SVD)."
        )
    if whitened is not None and (not callable(whitened) or not activation_aware):
        raise ValueError(
            f"whitened={whitened!r}: pass a function whitened(weight, S, rank) -> (A, B, s), with "
            f"activation_aware=True (got {activation_aware}); or None for labkit's whitened_factors."
        )
    if activation_aware:
        check_calibration(calibration, model)
        check_count(batch_size, "batch_size")
        check_damping(percdamp)
    start = time.perf_counter()
    layers: dict[str, LayerRank] = {}

    def factor(name: str, linear: nn.Linear, H: torch.Tensor | None) -> LowRankLinear:
        if H is None:
            A, B, s = truncated_svd(linear.weight, min(linear.in_features, linear.out_features))
        elif whitened is None:
            A, B, s = whitened_svd(linear.weight, H, min(linear.in_features, linear.out_features), percdamp)
        else:  # the learner's factors, from labkit's whitening
            full = min(linear.in_features, linear.out_features)
            S = whitening(H.to(linear.weight.device), percdamp)
            A, B, s = _checked_factors(whitened(linear.weight.detach().clone(), S.clone(), full), linear, full, name)
        if rank is not None:
            r = rank[name] if isinstance(rank, dict) else rank
        elif param_ratio is not None:
            r = rank_for_ratio(linear.in_features, linear.out_features, param_ratio)
        else:
            r = rank_for_energy(s, energy)
        layers[name] = LayerRank(r, s.numel(), _params(linear), _params(linear, r), discarded(s, r))
        bias = linear.bias.detach() if linear.bias is not None else None
        return LowRankLinear.from_factors(A[:r], B[:, :r], bias, dtype=linear.weight.dtype)

    if not activation_aware:
        for name, linear in linears.items():
            set_module(model.model.layers, name.removeprefix("layers."), factor(name, linear, None))
    else:
        chosen = {id(linear): name for name, linear in linears.items()}

        def make_stats(name, linear):
            return Hessian(linear.in_features, device=linear.weight.device) if id(linear) in chosen else None

        def update(index, layer, stats):
            for name, stat in stats.items():
                full = f"layers.{index}.{name}"
                set_module(layer, name, factor(full, layer.get_submodule(name), stat.H))

        groups = None
        if sequential:
            names = {name for name, _ in model.model.layers[0].named_modules()}
            groups = [[n for n in group if n in names] for group in SEQUENTIAL_GROUPS]
        calibration_walk(
            model,
            calibration,
            make_stats,
            update,
            device=device,
            sequential=groups,
            batch_size=batch_size,
            desc="svd-llm",
        )
    report = LowRankReport(
        "svd-llm" if activation_aware else "svd",
        time.perf_counter() - start,
        layers,
        sum(l.params_before for l in layers.values()),
        sum(l.params_after for l in layers.values()),
    )
    record(model, report.method, f"{report.kept:.0%} of the factored linears' parameters kept", "lowrank")
    return report


def lowrank_linears(model) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


__all__ = [
    "TARGETS",
    "LayerRank",
    "LowRankLinear",
    "LowRankReport",
    "check_choice",
    "check_rank",
    "discarded",
    "factor_targets",
    "lowrank_linears",
    "rank_for_energy",
    "rank_for_ratio",
    "svd",
    "truncated_svd",
    "whitened_factors",
    "whitened_svd",
    "whitening",
]
