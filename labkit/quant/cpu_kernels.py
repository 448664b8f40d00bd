"""Real low-bit speed on the CPU: torch's weight-only int8 and int4 matmuls run labkit's own layouts.

    from labkit.quant import cpu_kernels
    quant.rtn(model, 4, 32, float_offset=True)          # or quant.gptq(..., act_order=False), quant.w8a16(model)
    report = cpu_kernels.to_cpu_kernels(model)         # every QuantLinear / W8A16 layer on the CPU kernels

torch (2.13, CPU) has two weight-only matmuls that read low-bit weights straight from memory:
    aten._weight_int8pack_mm(x, w, s)               y = x · (w · s)ᵀ,  w int8 [out, in], s [out]
    aten._weight_int4pack_mm_for_cpu(x, w, g, sz)   y = x · ŵᵀ,  ŵ[n, k] = (q[n, k] − 8) · s[k//g, n] + z[k//g, n]
The first reads labkit's W8A16 layout as it is (quant.int8.Int8Linear: weight_int8 [out, in], one fp32
scale per output row). The second needs its own order of the 4-bit codes, made once by
aten._convert_weight_to_int4pack_for_cpu from QuantLinear's codes, and its own offset form: labkit stores
ŵ = s · (q − zp) (integer zero point) or ŵ = s · q + m (float offset, GGUF Q4_1's), so z = s · (8 − zp)
or z = m + 8 · s. Group sizes 32, 64, 128 or 256; act-order layers (g_idx) are refused.

Both are fast only with bf16 activations: with fp32 inputs torch takes a slow fallback (measured on this
course's 2-core CPU for a 1536 × 576 layer at one token: int8 528 µs and int4 1188 µs with fp32 inputs,
22 µs and 28 µs with bf16, against 46 µs for F.linear in fp32). So each layer here rounds its input
to bf16 (8 significant bits; the weights are exactly what was quantized), runs the kernel, and returns
the model's dtype; the kernels also take their scales (and int4 offsets) in bf16, which moves each
weight by at most 2⁻⁹ of its scale times its code's distance from the offset (fp16 activations, which
would keep GGUF's fp16 scales exact, take the slow path too). Both roundings are numerical changes of their
own: benchmarks/bench_cpu_decode.py measures their perplexity cost and how soon greedy tokens part from
the dequantized model's.

The output layer (lm_head, tied to the embedding in SmolLM2) is a 576 × 49,152 matrix that every decoded
token reads in full: lm_head=True gives it an int8 copy (the embedding stays float for the lookup).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..models import check_llama, set_module
from ..transform import all_or_nothing, record
from .int8 import Int8Linear, absmax_quantize
from .qlinear import QuantLinear

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
ACTIVATION_DTYPE = torch.bfloat16  # the dtype the kernels are fast with (see the module docstring)


class Int8CPULinear(nn.Module):
    """W8A16 on aten._weight_int8pack_mm: int8 weights [out, in] with one scale per output row (the layout
    of quant.int8.Int8Linear), bf16 activations inside, the input's dtype outside."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())  # [out, in] int8
        self.register_buffer("weight_scale", weight_scale.to(ACTIVATION_DTYPE).contiguous())  # [out]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_int8_linear(cls, layer: Int8Linear) -> Int8CPULinear:
        if layer.act != "float":
            raise ValueError(
                f"layer.act={layer.act!r}: the int8 CPU kernel is weight-only (W8A16, act='float'); W8A8 layers "
                f"already run torch._int_mm."
            )
        return cls(layer.weight_int8, layer.weight_scale, layer.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8CPULinear:
        """Absmax int8 per output row (quant.int8.absmax_quantize), e.g. for the output layer."""
        q, scale = absmax_quantize(linear.weight.detach(), dim=1)
        return cls(q, scale[:, 0], linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:  # [out, in] fp32, what the kernel multiplies by
        return self.weight_int8.float() * self.weight_scale.float()[:, None]

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_int8, self.weight_scale))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, bf16 activations"


class Int4CPULinear(nn.Module):
    """W4A16 on aten._weight_int4pack_mm_for_cpu: QuantLinear's 4-bit codes in the kernel's packed order,
    scales and offsets [in / group_size, out, 2], bf16 activations inside."""

    def __init__(self, packed, scales_and_zeros, group_size: int, bias, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> Int4CPULinear:
        check_int4(layer, "layer")
        scale = layer.scales.float()  # [out, n_groups]
        zero = layer.zero_points()  # [out, n_groups]: integer zero points, or float offsets m
        z = zero + 8 * scale if layer.float_offset else scale * (8 - zero)
        scales_and_zeros = torch.stack([scale.t(), z.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.codes().to(torch.int32).contiguous(), 1)
        return cls(packed, scales_and_zeros, layer.group_size, layer.bias, layer.out_features, layer.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:  # [out, in] fp32: the kernel's weights, as it returns them (bf16)
        eye = torch.eye(self.in_features, dtype=ACTIVATION_DTYPE)
        return (
            torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
            .float()
            .t()
        )

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only "
            f"g{self.group_size}, bf16 activations"
        )


def check_int4(layer, name: str) -> None:
    """A QuantLinear the int4 kernel can run, or ValueError naming what it lacks."""
    if not isinstance(layer, QuantLinear):
        raise ValueError(f"{name}: expected a labkit QuantLinear, got {type(layer).__name__}.")
    if layer.bits != 4:
        raise ValueError(f"{name}: the int4 CPU kernel takes 4-bit codes; this layer has bits={layer.bits}.")
    if layer.group_size not in INT4PACK_GROUP_SIZES or layer.in_features % layer.group_size:
        raise ValueError(
            f"{name}: the int4 CPU kernel takes group_size in {INT4PACK_GROUP_SIZES} dividing in_features; got "
            f"group_size={layer.group_size}, in_features={layer.in_features}."
        )
    if layer.g_idx is not None:
        raise ValueError(
            f"{name}: act-order layers (g_idx) do not fit the int4 CPU kernel; quantize with act_order=False."
        )


def cpu_kernels_available() -> bool:
    """True if this torch has both CPU kernels (torch >= 2.6 or so; checked by name)."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"))


@dataclasses.dataclass
class CPUKernelReport:
    int4_layers: int = 0
    int8_layers: int = 0
    lm_head: bool = False
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


def _layer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@torch.no_grad()
@all_or_nothing
def to_cpu_kernels(model, lm_head: bool = True) -> CPUKernelReport:
    """Run `model`'s quantized linears on the CPU kernels, in place: every 4-bit QuantLinear becomes an
    Int4CPULinear, every W8A16 Int8Linear (quant.w8a16) an Int8CPULinear; with lm_head=True the output
    layer gets an int8 copy (Int8CPULinear.from_linear). Every layer is checked before any is replaced
    (a failed call leaves the model unchanged). The model must be on the CPU; its other layers stay as
    they are. Returns the counts and the replaced layers' bytes before and after."""
    check_llama(model, "quant.to_cpu_kernels")
    if not cpu_kernels_available():
        raise ValueError(
            "quant.to_cpu_kernels: this torch lacks aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu."
        )
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices != {"cpu"}:
        raise ValueError(f"quant.to_cpu_kernels: the model must be on the CPU; it has tensors on {sorted(devices)}.")
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            check_int4(module, name)
            targets[name] = module
        elif isinstance(module, Int8Linear):
            if module.act != "float":
                raise ValueError(
                    f"{name}: act={module.act!r}; the int8 CPU kernel is weight-only (quant.w8a16). W8A8 layers "
                    f"already run torch._int_mm."
                )
            targets[name] = module
    head = model.get_output_embeddings() if lm_head else None
    if lm_head and not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head=True: the output layer is a {type(head).__name__}, not an nn.Linear.")
    if not targets and head is None:
        raise ValueError(
            "quant.to_cpu_kernels: nothing to convert: quantize first (quant.rtn / quant.gptq with 4 bits and "
            "groups of 32-256, or quant.w8a16), or pass lm_head=True."
        )
    report = CPUKernelReport(lm_head=head is not None)
    for name, module in targets.items():
        new = (
            Int4CPULinear.from_quant_linear(module)
            if isinstance(module, QuantLinear)
            else Int8CPULinear.from_int8_linear(module)
        )
        report.weight_bytes_before += _layer_bytes(module)
        report.weight_bytes_after += _layer_bytes(new)
        report.int4_layers += isinstance(new, Int4CPULinear)
        report.int8_layers += isinstance(new, Int8CPULinear)
        set_module(model, name, new)
    if head is not None:
        new_head = Int8CPULinear.from_linear(head)  # tied to the embedding: the embedding keeps its float copy
        report.weight_bytes_before += head.weight.numel() * head.weight.element_size()
        report.weight_bytes_after += _layer_bytes(new_head)
        model.set_output_embeddings(new_head)
        model.config.tie_word_embeddings = False  # the int8 copy is the output layer's own now
    record(
        model, "CPU kernels", f"int4 x{report.int4_layers}, int8 x{report.int8_layers + (head is not None)}", "quantize"
    )
    return report


__all__ = [
    "ACTIVATION_DTYPE",
    "INT4PACK_GROUP_SIZES",
    "CPUKernelReport",
    "Int4CPULinear",
    "Int8CPULinear",
    "check_int4",
    "cpu_kernels_available",
    "to_cpu_kernels",
]
