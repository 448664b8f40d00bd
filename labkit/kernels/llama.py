"""A transformers Llama run through labkit's fused kernels: W4A16 linears and a fused decoder layer.

    from labkit.kernels import llama as fused
    report = fused.fuse(model)                                  # fused RMSNorm + residual, SwiGLU
    report = fused.fuse(model, w4a16=True, group_size=128)      # ... and every decoder linear in 4 bits
    fused.set_backend(model, "torch", layers=[0])               # layer 0: the torch references

`fuse` changes the model in place. Each decoder layer then runs
    t = rms_norm(h)                        h: the residual stream
    a = self_attn(t)                       transformers' own attention (its rotary, SDPA, KV cache)
    t, h = rms_norm(a, residual=h)         one kernel: h = h + a, t = rms_norm(h)
    h = h + down(silu_and_mul(gate(t), up(t)))
instead of transformers' separate add / norm / act / mul kernels. With w4a16=True every nn.Linear
inside the decoder layers becomes a W4A16Linear: 4-bit codes packed two per byte, a scale and a zero
point per group, multiplied by kernels.w4a16_matmul (Triton on CUDA, dequantize-then-matmul in torch
elsewhere). The embedding and the output layer stay as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..models import check_llama, decoder_layers, linear_layers, set_module
from ..quant.qlinear import QuantLinear
from ..transform import all_or_nothing, check_model, record
from . import _triton
from .fused import (
    check_kernel,
    rms_norm,
    rms_norm_torch,
    swiglu,
    w4a16_dequantize,
    w4a16_from_codes,
    w4a16_matmul,
)


class W4A16Linear(nn.Module):
    """y = x · Wᵀ (+ bias) with W [out, in] stored as 4-bit codes (labkit.kernels.fused's layout: the codes
    of a QuantLinear, the same nibble order, one row per output; zeros unpacked).

    Buffers: qweight uint8 [out, in // 2]; scales, zeros [out, in // group_size], with
    W[n, k] = (code[n, k] - zeros[n, k // g]) · scales[n, k // g]."""

    def __init__(self, qweight, scales, zeros, group_size: int, bias=None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = 2 * qweight.shape[1], qweight.shape[0]
        self.group_size, self.backend = group_size, backend
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, float_offset: bool = False, backend: str = "auto"
    ) -> W4A16Linear:
        """Round-to-nearest 4-bit quantization of `linear` into labkit.quant's 4-bit layout (a QuantLinear,
        labkit.quant.qlinear), repacked for the kernel by from_quant_linear."""
        from ..quant.qlinear import QuantLinear  # labkit.quant is only needed here

        return cls.from_quant_linear(QuantLinear.from_linear(linear, 4, group_size, float_offset=float_offset), backend)

    @classmethod
    def from_quant_linear(cls, quantized, backend: str = "auto") -> W4A16Linear:
        """A 4-bit labkit.quant.qlinear.QuantLinear (without act-order) in this kernel's layout.

        Integer zero points (the usual asymmetric grid) are stored with fp16 scales. A float-offset grid
        (GGUF Q4_1-style, ŵ = scale·q + offset) is stored as zero = -offset / scale, in fp32 so that the
        weights come back to within fp32 rounding."""
        if getattr(quantized, "bits", None) != 4 or getattr(quantized, "g_idx", None) is not None:
            raise ValueError(
                f"from_quant_linear needs a 4-bit QuantLinear without act-order (g_idx); got "
                f"{type(quantized).__name__} with bits={getattr(quantized, 'bits', None)!r}."
            )
        group_size = quantized.group_size or quantized.in_features  # None: one group per row
        codes, scale, zero = quantized.codes(), quantized.scales.float(), quantized.zero_points()
        if quantized.float_offset:
            scales, zeros = scale, (-zero / scale).float()
        else:
            scales, zeros = scale.half(), zero.half()  # fp16-representable scales; integer zeros 0..15
        qweight, scales, zeros = w4a16_from_codes(codes, scales, zeros, group_size)
        return cls(qweight, scales, zeros, group_size, quantized.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        y = w4a16_matmul(x.contiguous(), self.qweight, self.scales, self.zeros, self.group_size, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:  # [out, in]
        return w4a16_dequantize(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def stored_bytes(self) -> int:
        """Codes, scales and zeros (and bias): what labkit.evaluate.weight_bytes counts for this layer."""
        tensors = [self.qweight, self.scales, self.zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, 4 bits, g{self.group_size}, "
            f"scales {str(self.scales.dtype)[6:]}, backend={self.backend!r}"
        )


def fused_decoder_forward(layer, hidden_states, *args, backend: str = "auto", rms_norm_kernel=None, **kwargs):
    """LlamaDecoderLayer.forward with the residual add fused into the second RMSNorm and SwiGLU fused.

    hidden_states: [batch, seq, hidden]; every other argument goes to transformers' attention as the
    original forward passes it (attention_mask, position_embeddings, the KV cache, ...).
    rms_norm_kernel: None (labkit's) or the Triton kernel both RMSNorms launch (kernels.rms_norm's kernel=)."""
    ln1, ln2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
    h = hidden_states.contiguous()
    t = rms_norm(h, ln1.weight, ln1.variance_epsilon, backend=backend, kernel=rms_norm_kernel)
    a, _ = layer.self_attn(t, *args, **kwargs)
    t, h = rms_norm(  # h = h + a, t = rms_norm(h): one kernel
        a.contiguous(), ln2.weight, ln2.variance_epsilon, residual=h, backend=backend, kernel=rms_norm_kernel
    )
    return h + mlp.down_proj(swiglu(mlp.gate_proj(t), mlp.up_proj(t), backend=backend))


def check_rms_norm_kernel(kernel) -> None:
    """A learner's RMSNorm kernel, tried on two small rows (with and without the residual) against the torch
    reference before it goes into a model: ValueError if it cannot run here or computes something else."""
    check_kernel(kernel, "rms_norm_kernel")
    if kernel is None:
        return
    if not (_triton.available() and (_triton.interpreted() or torch.cuda.is_available())):
        raise ValueError(
            "rms_norm_kernel: a Triton kernel runs on a CUDA GPU, or on the CPU in Triton's interpreter "
            "(TRITON_INTERPRET=1 set before labkit.kernels is imported); neither is available here."
        )
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 40, generator=g).to(_triton.device()) for _ in range(2))
    w = (1 + 0.1 * torch.randn(40, generator=g)).to(_triton.device())
    for residual in (None, r):
        got = rms_norm(x, w, 1e-6, residual=residual, backend="triton", kernel=kernel)
        expected = rms_norm_torch(x, w, 1e-6, residual)
        got, expected = (got, expected) if residual is not None else ((got,), (expected,))
        if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(got, expected)):
            raise ValueError(
                f"rms_norm_kernel computes something else than RMSNorm {'with' if residual is not None else 'without'} "
                f"the residual on a 2 x 40 test (check.lesson10.rms_norm_kernel says what). The model is unchanged."
            )


@all_or_nothing
def fuse(
    model,
    w4a16: bool = False,
    group_size: int = 128,
    float_offset: bool = False,
    backend: str = "auto",
    layers=None,
    rms_norm_kernel=None,
) -> dict:
    """Make `model`'s decoder layers (all, or the indices in `layers`) run the fused kernels, in place.

    w4a16: also replace each nn.Linear in those layers by a W4A16Linear (round-to-nearest, 4 bits,
    `group_size`), and each 4-bit QuantLinear already there (quant.gptq's or quant.rtn's, without
    act-order) by a W4A16Linear with its own codes: one 4-bit layout, repacked for the kernel (the
    `group_size` and `float_offset` arguments apply to the float linears only).
    rms_norm_kernel: None (labkit's) or your own Triton RMSNorm kernel (lesson 10's "build it";
    kernels.rms_norm's kernel=), tried on a small case before the model is changed; it runs in the layers
    whose backend is Triton. Returns {"layers": n, "linears": n, "weights": n}: what was changed."""
    check_llama(model, "labkit.kernels.llama.fuse")
    check_rms_norm_kernel(rms_norm_kernel)
    all_layers = decoder_layers(model)
    chosen = range(len(all_layers)) if layers is None else list(layers)
    quantized = {  # 4-bit layers a quantization method made: the kernel takes their codes as they are
        (i, name): m
        for i in chosen
        if 0 <= i < len(all_layers)
        for name, m in all_layers[i].named_modules()
        if isinstance(m, QuantLinear)
    }
    if w4a16:
        if not quantized:  # round-to-nearest from the float weights: only a model not quantized before
            check_model(model, "labkit.kernels.llama.fuse(w4a16=True)")
        for (i, name), m in quantized.items():
            if m.bits != 4 or m.g_idx is not None:
                raise ValueError(
                    f"fuse: layers.{i}.{name} is a {m.bits}-bit QuantLinear"
                    f"{' with act-order' if m.g_idx is not None else ''}; the W4A16 kernel takes 4-bit codes in "
                    f"column order (quantize with act_order=False)."
                )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"fuse: group_size={group_size!r}: need a positive even integer, e.g. 128.")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"fuse: the fused MLP computes SiLU(gate) · up; this model's hidden_act is {act!r}.")
    report = {"layers": 0, "linears": 0, "weights": 0}
    for i in chosen:
        if not 0 <= i < len(all_layers):
            raise ValueError(f"fuse: layer index {i} is outside 0..{len(all_layers) - 1}.")
        layer = all_layers[i]
        if w4a16:
            for name, linear in linear_layers(layer).items():
                if linear.in_features % group_size or group_size % 2:
                    raise ValueError(
                        f"fuse: group_size={group_size} must be even and divide {name}'s "
                        f"in_features={linear.in_features}."
                    )
                report["weights"] += linear.in_features * linear.out_features  # before parking empties it
                set_module(layer, name, W4A16Linear.from_linear(linear, group_size, float_offset, backend))
                report["linears"] += 1
            for name, m in [(n, m) for (j, n), m in quantized.items() if j == i]:
                report["weights"] += m.in_features * m.out_features
                set_module(layer, name, W4A16Linear.from_quant_linear(m, backend))
                report["linears"] += 1
        layer.forward = functools.partial(
            fused_decoder_forward, layer, backend=backend, rms_norm_kernel=rms_norm_kernel
        )
        report["layers"] += 1
    if w4a16:
        setting = "the QuantLinears' own codes" if quantized else f"W4 g{group_size}"
        record(model, "W4A16 (fused)", setting, "quantize")
    return report


def set_backend(model, backend: str, layers=None) -> None:
    """Switch fused layers (all, or the indices in `layers`) and their W4A16Linears to `backend`
    ("auto" | "triton" | "torch"), e.g. to run one layer in Triton's interpreter on a CPU."""
    all_layers = decoder_layers(model)
    chosen = list(range(len(all_layers)) if layers is None else layers)
    for i in chosen:  # every layer checked before any changes
        if not (isinstance(i, int) and 0 <= i < len(all_layers)):
            raise ValueError(f"set_backend: layer index {i!r} is outside 0..{len(all_layers) - 1}.")
        if not isinstance(all_layers[i].__dict__.get("forward"), functools.partial):
            raise ValueError(f"set_backend: layer {i} is not fused; call fuse(model) first.")
    for i in chosen:
        layer = all_layers[i]
        kernel = layer.forward.keywords.get("rms_norm_kernel")  # fuse's choice stays
        layer.forward = functools.partial(fused_decoder_forward, layer, backend=backend, rms_norm_kernel=kernel)
        for module in layer.modules():
            if isinstance(module, W4A16Linear):
                module.backend = backend
