"""Round-to-nearest (RTN) weight quantization of every decoder linear: the baseline GPTQ improves on.

Each weight is rounded to the nearest level of its group's grid, independently of all the others
and of the data: no calibration. Embeddings and the output layer stay in float, as in the GPTQ paper.
"""

from __future__ import annotations

import time

import torch

from ..models import decoder_layers, linear_layers
from ..transform import all_or_nothing, check_model, record, replace_data
from .formats import dequantize, quantize
from .qlinear import QuantLinear, QuantReport, check_model_settings, set_module


@torch.no_grad()
@all_or_nothing
def rtn(
    model, bits: int, group_size: int | None = None, sym: bool = False, pack: bool = True, float_offset: bool = False
) -> QuantReport:
    """Quantize every nn.Linear of the decoder layers in place; returns a QuantReport.

    pack=True replaces each with a QuantLinear (packed codes: weight_bytes shrinks); pack=False keeps
    nn.Linear holding the fake-quantized float weights (same outputs, float storage).
    float_offset=True: GGUF Q4_1-style grid (scale + float minimum) instead of an integer zero point.
    """
    check_model(model, "quant.rtn")
    group_size = check_model_settings(model, bits, group_size)
    report = QuantReport("RTN", bits, group_size, sym, float_offset, packed=pack)
    start = time.perf_counter()
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in linear_layers(layer).items():
            w = linear.weight.data  # [out, in]
            codes, scales, zeros = quantize(w, bits, group_size, sym, float_offset=float_offset)
            w_hat = dequantize(codes, scales, zeros, group_size, float_offset=float_offset, dtype=w.dtype)
            report.errors[f"layers.{index}.{name}"] = (
                (w - w_hat).float().pow(2).sum() / w.float().pow(2).sum().clamp(min=1e-30)
            ).item()
            if pack:
                packed = QuantLinear.replacing(
                    linear, codes, scales, zeros, bits, group_size, sym=sym, float_offset=float_offset
                )
                set_module(layer, name, packed)
            else:
                replace_data(linear.weight, w_hat)
            report.layers += 1
            report.params += w.numel()
    report.seconds = time.perf_counter() - start
    record(model, "RTN", report.setting, "quantize")
    return report
