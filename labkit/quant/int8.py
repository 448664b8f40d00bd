"""Int8 arithmetic shared by LLM.int8() and SmoothQuant: absmax quantization, a real int8 matmul, and
Int8Linear, a linear layer that stores int8 weights and runs its activations in one of three ways.

Vector-wise absmax quantization (LLM.int8() sec. 3.2; SmoothQuant sec. 2): each row (or column) of a
matrix gets its own scale so that its largest |value| maps to 127:
    s = max|x| / 127,   q = round(x / s) in [−127, 127] (int8),   x̂ = s · q
Weights W [out, in] are scaled per output row ("per channel"), activations X [tokens, in] per token
(one scale per row of X, computed on the fly: "dynamic"). Then
    X Wᵀ ≈ (s_X ⊗ s_W) ∘ (Q_X Q_Wᵀ)        (LLM.int8() eq. 3: outer product of the two scale vectors)
and Q_X Q_Wᵀ is an integer matmul with int32 accumulation, which int8 hardware runs natively.

The int8 matmul runs for real with torch._int_mm where this torch offers it (CPU in torch 2.13; CUDA
needs more than 16 rows and sizes that are multiples of 8); otherwise an exact reference computes the
same integers (`int8_matmul_reference`). `matmul_path()` says which ran last.
(On CUDA, _int_mm wants more than 16 rows: a decode step's single token is padded with zero rows.)
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import check_weight

INT8_MAX = 127  # symmetric grid [−127, 127]: −128 is left out so that the grid is symmetric around 0
ACT_MODES = ("float", "per-token", "llm.int8")  # W8A16 | W8A8 | W8A8 with 16-bit outlier features

_last_path = {"path": "none yet"}


# --- absmax quantization -----------------------------------------------------------------------------


def absmax_quantize(x: torch.Tensor, dim: int | None = -1):
    """Symmetric absmax int8 quantization along `dim` (None: one scale for the whole tensor).

    x: [..., n]. Returns (q int8 of x's shape, scale fp32 broadcastable to x: x's shape with `dim`
    reduced to 1, or [1, ..., 1] for dim=None). A row of zeros gets scale 1 (its codes are all 0).
    """
    xf = x.float()
    absmax = xf.abs().amax() if dim is None else xf.abs().amax(dim, keepdim=True)
    if dim is None:
        absmax = absmax.reshape([1] * x.dim())
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


# --- the int8 matmul -------------------------------------------------------------------------------


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [M, K] int8, b: [N, K] int8 -> a bᵀ [M, N] int32, exactly.

    Computed in float64: every product is at most 127² = 16,129 and every partial sum at most
    K · 16,129, integers far below 2^53, so each float64 operation is exact (and the sum fits int32
    for K < 133,000). A stand-in for int8 hardware, not a fast path."""
    return (a.double() @ b.double().T).to(torch.int32)


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    if a.device.type == "cuda":  # cuBLAS int8 GEMM: K and N multiples of 8 (M > 16: padded below)
        return a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0
    return a.device.type == "cpu"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [M, K] int8, b: [N, K] int8 (a weight in nn.Linear's layout) -> a bᵀ [M, N] int32.

    Uses torch._int_mm (a real int8 GEMM with int32 accumulation) when it accepts these operands,
    else the exact reference. Both give the same integers."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"int8_matmul needs int8 matrices a [M, K] and b [N, K]; got {tuple(a.shape)} {a.dtype} "
            f"and {tuple(b.shape)} {b.dtype}."
        )
    if _int_mm_ok(a, b):
        try:
            m = a.shape[0]
            if a.device.type == "cuda" and m <= 16:  # cuBLAS wants M > 16: pad with zero rows (decoding: M = 1)
                a = torch.nn.functional.pad(a, (0, 0, 0, 17 - m))
            out = torch._int_mm(a, b.T)[:m]
            _last_path["path"] = f"torch._int_mm ({a.device.type})"
            return out
        except RuntimeError:  # an unsupported layout or build: fall back, still exact
            pass
    _last_path["path"] = f"exact float64 reference ({a.device.type})"
    return int8_matmul_reference(a, b)


def matmul_path() -> str:
    """Which int8 matmul ran last: 'torch._int_mm (cpu)' or 'exact float64 reference (...)'."""
    return _last_path["path"]


# --- the layer -------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A linear layer stored as int8 weights with one fp32 scale per output row.

    Stored (buffers): weight_int8 int8 [out, in], weight_scale fp32 [out], bias as the original's.
    act decides what happens to the input x [..., in]:
      "float"      W8A16: the weight is dequantized on the fly, x stays in float.
      "per-token"  W8A8: x is quantized per token (dynamic absmax), the matmul is int8 -> int32.
      "llm.int8"   LLM.int8(): input features where any |x| >= threshold (outliers) go through a float
                   matmul with the dequantized weight columns; the rest as "per-token" (eq. 4). The
                   features seen as outliers are accumulated in `outlier_seen` [in] (not stored).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        act: str = "per-token",
        threshold: float = 6.0,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if act not in ACT_MODES:
            raise ValueError(f"act={act!r}: allowed are {ACT_MODES} (W8A16, W8A8, LLM.int8()).")
        check_threshold(threshold)
        self.in_features, self.out_features, self.act, self.threshold = in_features, out_features, act, threshold
        self.dtype = dtype
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer(
            "outlier_seen", torch.zeros(in_features, dtype=torch.bool, device=device), persistent=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, act: str = "per-token", threshold: float = 6.0) -> Int8Linear:
        w = linear.weight.detach()  # [out, in]
        check_weight(w, "linear.weight")
        layer = cls(
            linear.in_features,
            linear.out_features,
            act,
            threshold,
            linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        q, scale = absmax_quantize(w, dim=1)  # row-wise: one scale per output channel
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale[:, 0])
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # [out, in]
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self.act == "float":
            y = nn.functional.linear(x, self.dequantized_weight(x.dtype))
        else:
            x2 = x.reshape(-1, self.in_features)  # [tokens, in]
            y = self._mixed(x2) if self.act == "llm.int8" else self._int8(x2)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _int8(self, x2: torch.Tensor) -> torch.Tensor:  # x2: [tokens, in] -> fp32 [tokens, out]
        xq, xs = absmax_quantize(x2, dim=1)  # per token: xs [tokens, 1]
        acc = int8_matmul(xq, self.weight_int8)  # int32 [tokens, out]
        return acc.float() * xs * self.weight_scale[None, :]  # LLM.int8() eq. 3: s_X ⊗ s_W ∘ (Q_X Q_Wᵀ)

    def _mixed(self, x2: torch.Tensor) -> torch.Tensor:
        # LLM.int8() eq. 4: X Wᵀ = Σ_{h∈O} X_h W_hᵀ (16-bit) + S ∘ Σ_{h∉O} Q_X,h Q_W,hᵀ (int8),
        # O = input features with any |x| >= threshold in this batch (decided on the fly).
        outliers = (x2.abs() >= self.threshold).any(0)  # [in] bool
        self.outlier_seen |= outliers
        if not outliers.any():
            return self._int8(x2)
        idx = outliers.nonzero()[:, 0]
        regular = x2.index_fill(1, idx, 0)  # outlier features removed before the per-token absmax
        w_out = self.weight_int8[:, idx].float() * self.weight_scale[:, None]  # [out, |O|] dequantized
        return self._int8(regular) + x2[:, idx].float() @ w_out.T

    def stored_bytes(self) -> int:
        """int8 weights + fp32 row scales (+ bias): what this layer really stores."""
        tensors = [self.weight_int8, self.weight_scale] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        mode = {"float": "W8A16", "per-token": "W8A8 per-token", "llm.int8": f"LLM.int8() threshold={self.threshold:g}"}
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {mode[self.act]}, "
            f"bias={self.bias is not None}"
        )


def check_threshold(threshold) -> None:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not threshold > 0
        or threshold != threshold
        or threshold == float("inf")
    ):
        raise ValueError(
            f"threshold={threshold!r}: the outlier threshold must be a finite number > 0 "
            f"(LLM.int8() uses 6.0; a feature is an outlier where any |x| >= threshold)."
        )


def int8_linears(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
