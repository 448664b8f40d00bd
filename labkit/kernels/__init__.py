"""Triton kernels for serving, each beside the plain torch reference it is tested against.

    from labkit import kernels
    out = kernels.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens)
    y, h = kernels.rms_norm(x, weight, eps, residual=h)
    y = kernels.w4a16_matmul(x, *kernels.w4a16_from_codes(codes, scales, zeros, 128), group_size=128)
    o = kernels.flash_attention(q, k, v)   # causal prefill attention, tiled with the online softmax

backend="auto" runs Triton on CUDA tensors and the torch reference otherwise. On a CPU machine,
set TRITON_INTERPRET=1 before importing this package and pass backend="triton" to run the Triton
code in its interpreter (slow; for tests and for stepping through a kernel): this package imports
triton where it is installed, and Triton chooses interpreter or GPU when it is imported. Without
triton (it is a dependency on Linux only) the torch references work and backend="triton" says how
to install it. `python -m labkit.kernels.offline` compiles every kernel for GPU targets (no GPU
needed) and reports registers, spills and shared memory.
"""

from ._triton import available as triton_available
from ._triton import device as triton_device
from ._triton import interpreted as triton_interpreted
from .flash_attention import attention_traffic, flash_attention, flash_attention_tiled_torch, flash_attention_torch
from .fused import (
    rms_norm,
    rms_norm_kernel,
    rms_norm_torch,
    rotary,
    rotary_torch,
    silu_and_mul,
    swiglu,
    swiglu_torch,
    w4a16_dequantize,
    w4a16_from_codes,
    w4a16_matmul,
    w4a16_matmul_torch,
    w4a16_unpack,
)
from .paged_attention import online_softmax_step, paged_attention_decode, paged_attention_decode_torch, weighted_sum
