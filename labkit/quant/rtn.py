"""Round-to-nearest (RTN) weight quantization of every decoder linear: the baseline GPTQ improves on.

Each weight is rounded to the nearest level of its group's grid, independently of all the others
and of the data: no calibration. Embeddings and the output layer stay in float, as in the GPTQ paper.
"""

from __future__ import annotations

import time

import torch

from ..models import decoder_layers, linear_layers
from ..transform import all_or_nothing, check_model, record, replace_data
from .formats import dequantize, n_groups
from .formats import quantize as labkit_quantize
from .qlinear import QuantLinear, QuantReport, check_model_settings, set_module


def _checked(answer, w: torch.Tensor, bits: int, group_size: int | None):
    """Your quantize's (codes, scale, zero) as labkit stores them, or ValueError saying what is off."""
    out_features, in_features = w.shape
    grid = (out_features, n_groups(in_features, group_size))
    if not (isinstance(answer, tuple) and len(answer) == 3 and all(isinstance(t, torch.Tensor) for t in answer)):
        raise ValueError(f"quantize returned {type(answer).__name__}; it must return a tuple (codes, scale, zero).")
    codes, scale, zero = answer
    problems = []
    if codes.shape != w.shape or not torch.isfinite(codes.float()).all() or not torch.equal(codes, codes.round()):
        problems.append(f"codes must be whole numbers shaped like the weight {tuple(w.shape)}")
    elif codes.numel() and not 0 <= codes.min().item() <= codes.max().item() <= 2**bits - 1:
        problems.append(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if scale.shape != grid or zero.shape != grid:
        problems.append(f"scale and zero must be [out, n_groups] = {grid}")
    elif not (torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero).all()):
        problems.append("scale must be positive and finite, zero finite")
    if problems:
        raise ValueError(
            f"quantize returned a grid labkit cannot store: {'; '.join(problems)}. The model is unchanged."
        )
    return codes.to(torch.uint8), scale.float(), zero.float()


@torch.no_grad()
@all_or_nothing
def rtn(
    model,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    pack: bool = True,
    float_offset: bool = False,
    quantize=None,
) -> QuantReport:
    """Quantize every nn.Linear of the decoder layers in place; returns a QuantReport.

    pack=True replaces each with a QuantLinear (packed codes: weight_bytes shrinks); pack=False keeps
    nn.Linear holding the fake-quantized float weights (same outputs, float storage).
    float_offset=True: GGUF Q4_1-style grid (scale + float minimum) instead of an integer zero point.
    quantize: None (labkit's quant.quantize) or your own function quantize(w [out, in], bits, group_size)
    -> (codes [out, in] integers, scale [out, n_groups], zero [out, n_groups]) of the asymmetric integer
    grid (lesson 04's "build it"); answers of another shape or range raise ValueError, the model unchanged.
    """
    check_model(model, "quant.rtn")
    group_size = check_model_settings(model, bits, group_size)
    if quantize is not None and (not callable(quantize) or sym or float_offset):
        raise ValueError(
            f"quantize={quantize!r}: pass a function quantize(w, bits, group_size) -> (codes, scale, zero) of the "
            f"asymmetric integer grid (sym=False, float_offset=False; got sym={sym}, float_offset={float_offset}), "
            "or None for labkit's."
        )
    report = QuantReport("RTN", bits, group_size, sym, float_offset, packed=pack)
    start = time.perf_counter()
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in linear_layers(layer).items():
            w = linear.weight.data  # [out, in]
            if quantize is None:
                codes, scales, zeros = labkit_quantize(w, bits, group_size, sym, float_offset=float_offset)
            else:
                codes, scales, zeros = _checked(quantize(w.clone(), bits, group_size), w, bits, group_size)
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
