"""QuantLinear: a linear layer stored as packed integer codes plus fp16 scales (and zeros).

Stored (all buffers, so `.to(device)` and `state_dict()` carry them):
    qweight  uint8 [ceil(out·in·bits/8)]       codes of W, row-major, packed (labkit.quant.pack)
    scales   fp16  [out, n_groups]               n_groups = in / group_size, 1 per channel
    qzeros   uint8 [ceil(out·n_groups·bits/8)]  integer zero points, packed like the codes
      or zeros fp16 [out, n_groups]              float offsets (float_offset=True, GGUF Q4_1-style)
    g_idx    int32 [in]                          group of each input column (act-order only)
    bias     as the original layer's
The forward pass dequantizes W (labkit.quant.formats.dequantize) and calls F.linear: the memory
saving is real on disk and at rest, the compute is a plain dense matmul (fused kernels come later).
`stored_bytes()` is what `labkit.evaluate.weight_bytes` counts for this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import decoder_layers, linear_layers, set_module  # noqa: F401  (set_module re-exported here)
from .formats import check_bits, check_group_size, dequantize, group_index, quantize
from .formats import n_groups as groups_of
from .pack import pack, packed_bytes, unpack


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        sym: bool = False,
        float_offset: bool = False,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        check_bits(bits)
        group_size = check_group_size(group_size, in_features)
        if act_order and group_size is None:
            act_order = False  # one group per row: the column order does not change any scale
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.float_offset = bits, group_size, sym, float_offset
        self.dtype = dtype  # of the original layer: what to_float() returns
        groups = groups_of(in_features, group_size)
        self.register_buffer(
            "qweight", torch.zeros(packed_bytes(out_features * in_features, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        if float_offset:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        else:
            self.register_buffer(
                "qzeros", torch.zeros(packed_bytes(out_features * groups, bits), dtype=torch.uint8, device=device)
            )
        if act_order:
            self.register_buffer("g_idx", group_index(in_features, group_size, device))
        else:
            self.g_idx = None
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int | None = None,
        *,
        sym: bool = False,
        float_offset: bool = False,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """From codes [out, in] (uint8), scales and zeros [out, in / group_size], optional g_idx [in].

        g_idx equal to arange(in) // group_size (no act-order) is not stored."""
        out_features, in_features = codes.shape
        group_size = check_group_size(group_size, in_features)
        expected = (out_features, groups_of(in_features, group_size))
        if scales.shape != expected or zeros.shape != expected:
            raise ValueError(
                f"codes {tuple(codes.shape)} with group_size={group_size} need scales and zeros of shape "
                f"{expected}; got {tuple(scales.shape)} and {tuple(zeros.shape)}."
            )
        if g_idx is not None:
            if g_idx.shape != (in_features,):
                raise ValueError(f"g_idx must be [in_features={in_features}]; got {tuple(g_idx.shape)}.")
            if torch.equal(g_idx.int(), group_index(in_features, group_size, g_idx.device)):
                g_idx = None
        layer = cls(
            in_features,
            out_features,
            bits,
            group_size,
            sym,
            float_offset,
            bias is not None,
            act_order=g_idx is not None,
            dtype=dtype,
            device=codes.device,
        )
        layer.qweight.copy_(pack(codes, bits))
        scales16 = scales.to(torch.float16)
        if not torch.equal(scales16.float(), scales.float()):
            raise ValueError(
                "scales are not representable in fp16: quantize with scale_dtype=torch.float16 "
                "(labkit.quant.formats.quantize does by default)."
            )
        layer.scales.copy_(scales16)
        if float_offset:
            layer.zeros.copy_(zeros.to(torch.float16))
        else:
            layer.qzeros.copy_(pack(zeros.round().to(torch.uint8), bits))
        if g_idx is not None:
            layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int | None = None, sym: bool = False, float_offset: bool = False
    ) -> QuantLinear:
        """Round-to-nearest quantization of an nn.Linear into a QuantLinear."""
        codes, scales, zeros = quantize(linear.weight.detach(), bits, group_size, sym, float_offset=float_offset)
        return cls.replacing(linear, codes, scales, zeros, bits, group_size, sym=sym, float_offset=float_offset)

    @classmethod
    def replacing(
        cls, linear: nn.Linear, codes, scales, zeros, bits: int, group_size: int | None = None, **options
    ) -> QuantLinear:
        """from_codes for codes [out, in] that quantize `linear`'s weight: its bias and dtype carry over.

        options: from_codes's sym, float_offset, g_idx."""
        bias, dtype = linear.bias, linear.weight.dtype
        return cls.from_codes(codes, scales, zeros, bits, group_size, **options, bias=bias, dtype=dtype)

    # --- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:  # [out, in] uint8
        return unpack(self.qweight, self.bits, (self.out_features, self.in_features))

    def zero_points(self) -> torch.Tensor:  # [out, n_groups] fp32: integer zeros, or float offsets
        if self.float_offset:
            return self.zeros.float()
        return unpack(self.qzeros, self.bits, (self.out_features, self.n_groups)).float()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # [out, in]
        return dequantize(
            self.codes(),
            self.scales.float(),
            self.zero_points(),
            self.group_size,
            g_idx=self.g_idx,
            float_offset=self.float_offset,
            dtype=dtype or self.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def to_float(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (the fake-quantized layer)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.qweight.device,
            dtype=self.dtype,
        )
        linear.weight.data.copy_(self.dequantized_weight(self.dtype))
        if self.bias is not None:
            linear.bias.data.copy_(self.bias.data)
        return linear

    def stored_bytes(self) -> int:
        """Packed codes + scales + zeros (+ g_idx) (+ bias): what this layer really stores."""
        tensors = [self.qweight, self.scales, self.zeros if self.float_offset else self.qzeros]
        tensors += [t for t in (self.g_idx, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        grid = "float offset" if self.float_offset else ("sym" if self.sym else "asym")
        groups = f"g{self.group_size}" if self.group_size else "per-channel"
        order = ", act-order" if self.g_idx is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"{groups}, {grid}{order}, bias={self.bias is not None}"
        )


# --- installing QuantLinears in a model ---------------------------------------------------------


def check_model_settings(model: nn.Module, bits: int, group_size: int | None) -> int | None:
    """Refuse bad settings before any layer changes: bits, and a group_size that must divide the in_features
    of every decoder linear (576 and 1536 on SmolLM2: g128 fits the MLP's down_proj but not the attention)."""
    check_bits(bits)
    widths = sorted({m.in_features for layer in decoder_layers(model) for m in linear_layers(layer).values()})
    for in_features in widths:
        group_size = check_group_size(group_size, in_features)
    return group_size


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@dataclass
class QuantReport:
    """What a quantization run did (plain data for a lesson's table)."""

    method: str  # "RTN" | "GPTQ"
    bits: int
    group_size: int | None
    sym: bool
    float_offset: bool = False
    act_order: bool = False
    packed: bool = True
    layers: int = 0  # linears quantized
    params: int = 0  # weights quantized
    seconds: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # per linear (e.g. 'layers.3.mlp.down_proj')
    # RTN: relative weight error ‖W − Ŵ‖² / ‖W‖²; GPTQ: its loss estimate Σ_q (w_q − quant(w_q))² / (2 [H_F⁻¹]_qq)

    @property
    def setting(self) -> str:  # e.g. "W4 g128", "W3 per-channel sym act-order"
        parts = [f"W{self.bits}", f"g{self.group_size}" if self.group_size else "per-channel"]
        parts += [
            p for p, on in (("sym", self.sym), ("float-offset", self.float_offset), ("act-order", self.act_order)) if on
        ]
        return " ".join(parts)
