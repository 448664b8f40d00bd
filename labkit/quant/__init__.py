"""Weight quantization, from torch operations: grids, bit packing, a packed linear layer, RTN, GPTQ,
and safetensors checkpoints (labkit's own layout and the AutoGPTQ "gptq" layout).

    from labkit import models, quant
    model, tok = models.load("smollm2-135m")
    report = quant.rtn(model, bits=4, group_size=128)                 # round to nearest
    report = quant.gptq(model, calibration, bits=4, group_size=128,   # GPTQ (Frantar et al. 2023)
                        act_order=True)

`quant.rtn` and `quant.gptq` are the functions; their modules are `labkit.quant.rtn` / `.gptq` in
sys.modules (use `from labkit.quant.gptq import gptq_quantize_weight`). `quant.pack` is the module.
"""
from .checkpoint import load_gptq, load_quantized, save_gptq, save_quantized  # noqa: F401
from .formats import (  # noqa: F401
    FP4, FP8_FORMATS, NF4, SUPPORTED_BITS, dequantize, dequantize_lut, fake_quantize, fp8_round,
    fp8_round_reference, quantize, quantize_fp8, quantize_lut,
)
from .gptq import TRUE_SEQUENTIAL, gptq, gptq_quantize_weight  # noqa: F401
from . import pack  # noqa: F401  (the module: quant.pack.pack(codes, bits), quant.pack.unpack(...))
from .qlinear import QuantLinear, QuantReport, quant_linears  # noqa: F401
from .rtn import rtn  # noqa: F401
