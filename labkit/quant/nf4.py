"""NF4 with double quantization: QLoRA's storage format (Dettmers et al., "QLoRA: Efficient Finetuning of
Quantized LLMs", NeurIPS 2023, sec. 3).

NormalFloat-4 (labkit.quant.formats.NF4): 16 levels at quantiles of N(0, 1), scaled to [−1, 1], with an
exact 0. Each block of 64 consecutive weights (of the flattened, row-major matrix, as bitsandbytes
blocks it) shares one absmax constant c₂ (fp32):
    code = nearest NF4 level to w / c₂,    ŵ = NF4[code] · c₂                 (QLoRA sec. 2-3, c₂ per block)
Storage: 4 bits per weight + 32 bits per 64 weights = 4.5 bits per weight.

Double quantization (sec. 3, "Double Quantization"): the constants c₂ are themselves quantized to
8 bits in blocks of 256, after subtracting their mean (they are all positive, so centring them lets a
symmetric grid use all its levels). Each block of 256 constants keeps one fp32 absmax c₁. Then
    4 + 8/64 + 32/(64 · 256) = 4.127 bits per weight  (plus one fp32 mean per matrix).
The 8-bit grid is bitsandbytes' "dynamic" map (signed, a float-like code with a variable number of
exponent bits: `dynamic_map()`), which is what QLoRA's "8-bit Floats" are in its code.

The weight is dequantized on the fly in `forward` (unpack, look up, scale) and then multiplied in
float: memory is saved at rest, and every forward pays the dequantization (lesson 06 measures it).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..models import decoder_layers, linear_layers, set_module
from ..transform import all_or_nothing, check_model, record
from .formats import NF4, check_weight, dequantize_lut, quantize_lut
from .pack import pack, unpack
from .qlinear import QuantReport

DQ_BLOCKSIZE = 256  # QLoRA: second-level blocks of 256 absmax constants


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 256 sorted values in [−1, 1].

    For e = 0..6, 2^e evenly spaced magnitudes in (0.1, 1) · 10^(e − 6), with both signs; plus 0 and 1.
    Fewer fraction steps for small magnitudes, more for large ones: relative precision ~1% near 1."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values), dtype=torch.float32)


def check_blocksize(blocksize, numel: int | None = None, what: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{what}={blocksize!r}: must be a positive integer number of weights per block (QLoRA: 64).")
    if numel is not None and numel % blocksize:
        raise ValueError(
            f"{what}={blocksize} does not divide the {numel} weights of a matrix into whole blocks; "
            f"use a divisor of {numel} (QLoRA: 64)."
        )
    return blocksize


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """8-bit quantization of the absmax constants (QLoRA's double quantization).

    absmax: [n] fp32. Returns (codes uint8 [n], scale fp32 [ceil(n / blocksize)], offset fp32 [1]):
    absmax ≈ dynamic_map()[codes] · scale[block] + offset. The last block may be shorter."""
    check_blocksize(blocksize)
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean().reshape(1)
    centred = absmax - offset
    pad = -centred.numel() % blocksize
    padded = torch.nn.functional.pad(centred, (0, pad))  # zeros: they never raise a block's absmax
    codes, scale = quantize_lut(padded.reshape(1, -1), dynamic_map(), blocksize)  # [1, n + pad], [1, n_blocks]
    return codes[0, : absmax.numel()], scale[0], offset


def double_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int = DQ_BLOCKSIZE,
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of double_quantize: [n] fp32 absmax constants. grid: dynamic_map(), if already at hand."""
    n = codes.numel()
    padded = torch.nn.functional.pad(codes.reshape(-1), (0, -n % blocksize)).reshape(1, -1)
    grid = dynamic_map() if grid is None else grid
    return dequantize_lut(padded, scale.reshape(1, -1), grid)[0, :n] + offset


class NF4Linear(nn.Module):
    """A linear layer stored in NF4: packed 4-bit codes + one absmax per block (optionally double-quantized).

    Stored (buffers): qweight uint8 [out·in / 2] (two codes per byte, labkit.quant.pack);
      without double quantization: absmax fp32 [out · in / blocksize]  (blocks of the flattened W);
      with it: absmax_codes uint8 [out · in / blocksize], absmax_scale fp32 [ceil(that / 256)],
               absmax_offset fp32 [1];
    bias as the original layer's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocksize: int = 64,
        double_quant: bool = True,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        check_blocksize(blocksize, out_features * in_features)
        self.in_features, self.out_features, self.blocksize, self.double_quant = (
            in_features,
            out_features,
            blocksize,
            double_quant,
        )
        self.dtype = dtype
        n_blocks = out_features * in_features // blocksize
        self.register_buffer(
            "qweight", torch.zeros((out_features * in_features + 1) // 2, dtype=torch.uint8, device=device)
        )
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.ones(-(-n_blocks // DQ_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros(1, device=device))
        else:
            self.register_buffer("absmax", torch.ones(n_blocks, device=device))
        # Constants, not stored: the 16 NF4 levels; the same as a table from a packed byte to its two values
        # (low nibble first, labkit.quant.pack's layout); the 8-bit map of the absmax constants.
        self.register_buffer("grid", NF4.clone().to(device), persistent=False)
        byte = torch.arange(256)
        self.register_buffer(
            "pair_table", torch.stack([NF4[byte & 15], NF4[byte >> 4]], 1).to(device), persistent=False
        )  # [256, 2]
        self.register_buffer("absmax_grid", dynamic_map().to(device), persistent=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        w = linear.weight.detach()  # [out, in]
        check_weight(w, "linear.weight")
        layer = cls(
            linear.in_features,
            linear.out_features,
            blocksize,
            double_quant,
            linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        codes, absmax = quantize_lut(w.reshape(1, -1), NF4, blocksize)  # [1, out·in] uint8, [1, n_blocks] fp32
        layer.qweight.copy_(pack(codes, 4))
        if double_quant:
            a_codes, a_scale, a_offset = double_quantize(absmax.reshape(-1))
            layer.absmax_codes.copy_(a_codes)
            layer.absmax_scale.copy_(a_scale)
            layer.absmax_offset.copy_(a_offset)
        else:
            layer.absmax.copy_(absmax.reshape(-1))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def block_absmax(self) -> torch.Tensor:  # [out · in / blocksize] fp32
        if self.double_quant:
            return double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_offset, grid=self.absmax_grid)
        return self.absmax

    def codes(self) -> torch.Tensor:  # [out, in] uint8, the NF4 level of each weight
        return unpack(self.qweight, 4, (self.out_features, self.in_features))

    def dequantized_weight_reference(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # [out, in]
        """Unpack the codes, look each up in the NF4 grid, scale by its block's absmax (formats.dequantize_lut)."""
        codes = self.codes().reshape(1, -1)
        w = dequantize_lut(codes, self.block_absmax()[None, :], self.grid, dtype=dtype or self.dtype)  # [1, out·in]
        return w.reshape(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # [out, in]
        """The same values as the reference, faster: each packed byte indexes a [256, 2] table of its two
        levels directly (no separate unpacking, int32 indices), then each block of 64 is scaled."""
        values = nn.functional.embedding(self.qweight.to(torch.int32), self.pair_table)  # [ceil(out·in / 2), 2]
        values = values.reshape(-1)[: self.out_features * self.in_features]  # (drops an odd count's padding)
        w = values.reshape(-1, self.blocksize) * self.block_absmax()[:, None]  # [n_blocks, blocksize]
        return w.reshape(self.out_features, self.in_features).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def stored_bytes(self) -> int:
        """Packed codes + absmax constants (or their 8-bit codes, scales and offset) (+ bias)."""
        names = ["qweight"] + (["absmax_codes", "absmax_scale", "absmax_offset"] if self.double_quant else ["absmax"])
        tensors = [getattr(self, n) for n in names] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, NF4 blocks of {self.blocksize}"
            f"{', double quant' if self.double_quant else ''}, bias={self.bias is not None}"
        )


@torch.no_grad()
@all_or_nothing
def nf4(model, blocksize: int = 64, double_quant: bool = True) -> QuantReport:
    """Store every decoder linear of `model` in NF4 (QLoRA), in place; returns a QuantReport whose
    `errors` hold each linear's relative weight error ‖W − Ŵ‖² / ‖W‖²."""
    check_blocksize(blocksize)
    check_model(model, "quant.nf4")
    layers = decoder_layers(model)
    for layer in layers:  # check every shape before changing anything
        for linear in linear_layers(layer).values():
            check_blocksize(blocksize, linear.weight.numel())
    report = QuantReport("NF4 + double quant" if double_quant else "NF4", 4, blocksize, sym=True)
    start = time.perf_counter()
    for index, layer in enumerate(layers):
        for name, linear in linear_layers(layer).items():
            q = NF4Linear.from_linear(linear, blocksize, double_quant)
            w = linear.weight.detach().float()
            report.errors[f"layers.{index}.{name}"] = (
                (w - q.dequantized_weight(torch.float32)).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30)
            ).item()
            set_module(layer, name, q)
            report.layers += 1
            report.params += w.numel()
    report.seconds = time.perf_counter() - start
    record(model, report.method, f"blocks of {blocksize}", "quantize")
    return report


def nf4_linears(model: nn.Module) -> dict[str, NF4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
