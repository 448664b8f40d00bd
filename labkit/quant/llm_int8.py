"""LLM.int8() (Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
NeurIPS 2022): vector-wise int8 quantization with a mixed-precision decomposition.

Beyond ~6.7 B parameters, a few hidden features carry activations 20-100x larger than the rest, in
almost every token. One absmax scale per token would then spend the int8 grid on those few values and
round everything else to 0. LLM.int8() splits the matmul by input feature (sec. 3.2, eq. 4):
    outlier features O = {h : any |X_{:,h}| >= threshold}  (threshold α = 6 in the paper)
    X Wᵀ = X_O W_Oᵀ (16-bit)  +  s_X ⊗ s_W ∘ (Q_X,Ō Q_W,Ōᵀ) (int8, per-token × per-row absmax)
O is found on the fly for each batch; it is tiny (the paper finds at most 7 features in 6.7B models),
so almost all multiply-adds stay int8. As in bitsandbytes, the weights are stored only in int8 (the
outlier columns are dequantized for the 16-bit part), so the memory is that of W8.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models import decoder_layers, linear_layers, set_module
from ..transform import all_or_nothing, check_count, check_model, record
from ..walk import check_calibration
from .int8 import Int8Linear, check_threshold, int8_linears, matmul_path


@dataclass
class Int8Report:
    """What an int8 conversion did (plain data for a lesson's table)."""

    method: str  # "LLM.int8()" | "W8A8" | "W8A16" | "SmoothQuant W8A8"
    setting: str  # e.g. "threshold 6", "per-channel W, per-token A"
    layers: int = 0
    params: int = 0
    seconds: float = 0.0
    outliers: dict[str, int] = field(default_factory=dict)  # LLM.int8(): input features seen as outliers, per linear
    matmul: str = ""  # which int8 matmul ran (labkit.quant.int8.matmul_path)
    smoothing: object = None  # SmoothQuant: the SmoothReport (labkit.quant.smoothquant)


def to_int8(model, act: str, threshold: float = 6.0) -> tuple[int, int]:
    """Replace every decoder nn.Linear by an Int8Linear (row-wise absmax int8 weights); returns (layers, params)."""
    layers = params = 0
    for layer in decoder_layers(model):
        for name, linear in linear_layers(layer).items():
            set_module(layer, name, Int8Linear.from_linear(linear, act, threshold))
            layers += 1
            params += linear.weight.numel()
    return layers, params


@torch.no_grad()
@all_or_nothing
def llm_int8(model, threshold: float = 6.0, calibration: torch.Tensor | None = None, batch_size: int = 4) -> Int8Report:
    """Convert every decoder linear of `model` to LLM.int8(), in place; returns an Int8Report.

    threshold: an input feature is an outlier in a batch where any |x| >= threshold (paper: 6.0).
    calibration: optional LongTensor [n, seqlen] of token ids run through the converted model, so
    that `report.outliers` counts, per linear, the input features that were outliers at least once.
    """
    check_threshold(threshold)
    check_model(model, "quant.llm_int8")
    if calibration is not None:
        check_calibration(calibration, model)
        check_count(batch_size, "batch_size", 4)
    report = Int8Report("LLM.int8()", f"threshold {threshold:g}")
    start = time.perf_counter()
    report.layers, report.params = to_int8(model, "llm.int8", threshold)
    report.seconds = time.perf_counter() - start
    record(model, report.method, report.setting, "quantize")
    if calibration is not None:
        device = next(model.parameters()).device
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i : i + batch_size].to(device), use_cache=False)
        report.outliers = outlier_counts(model)
        report.matmul = matmul_path()
    return report


def outlier_counts(model) -> dict[str, int]:
    """Per LLM.int8() linear ('layers.3.mlp.down_proj'): how many input features were outliers so far."""
    return {
        name.removeprefix("model."): int(m.outlier_seen.sum())
        for name, m in int8_linears(model).items()
        if m.act == "llm.int8"
    }


def reset_outliers(model) -> None:
    for m in int8_linears(model).values():
        m.outlier_seen.zero_()
