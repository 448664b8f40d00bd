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

# Activation quantization and QLoRA storage (lesson 06). As above, `quant.llm_int8`, `quant.smoothquant` and
# `quant.nf4` are the functions; `quant.int8` is the module of int8 arithmetic (absmax, int8_matmul, Int8Linear).
from . import (
    int8,
    pack,
)
from .awq import AWQReport, awq
from .checkpoint import load_gptq, load_quantized, save_gptq, save_quantized
from .cpu_kernels import to_cpu_kernels
from .ct_export import save_compressed_tensors
from .formats import (
    FP4,
    FP8_FORMATS,
    NF4,
    SUPPORTED_BITS,
    dequantize,
    dequantize_lut,
    fake_quantize,
    fp8_round,
    fp8_round_reference,
    quantize,
    quantize_fp8,
    quantize_lut,
)
from .gguf_export import save_gguf
from .gptq import GPTQResult, gptq, gptq_quantize_weight
from .int8 import Int8Linear, absmax_quantize, int8_matmul, matmul_path
from .llm_int8 import Int8Report, llm_int8, outlier_counts
from .nf4 import NF4Linear, double_dequantize, double_quantize, dynamic_map, nf4, nf4_linears
from .qlinear import QuantLinear, QuantReport, quant_linears
from .rtn import rtn
from .smoothquant import SmoothReport, smooth, smoothing_factors, smoothquant, w8a8, w8a16
