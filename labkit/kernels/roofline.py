"""The roofline model for a Llama decoder, memory traffic counted op by op, and timing helpers.

    from labkit.kernels import roofline
    gpu = roofline.device_peak("NVIDIA A100-SXM4-80GB")          # datasheet bandwidth and fp16 FLOP/s
    costs = roofline.decoder_layer_costs(config, tokens=1, context=2048)   # {op: Cost(flops, bytes)}
    roofline.attainable(costs["down_proj"].intensity, gpu)      # FLOP/s the op can reach at best
    ops = roofline.count_traffic(rms_norm_torch, x, w, 1e-6, r)  # what eager PyTorch reads and writes
    roofline.io_bytes(rms_norm_torch, x, w, 1e-6, r)           # what one fused kernel must read and write
    roofline.time_ms(fn, device)                               # median on CUDA, fastest on CPU

The roofline (Williams, Waterman and Patterson, CACM 2009): an op that does F floating-point
operations and moves B bytes to and from device memory takes at least max(F / peak FLOP/s,
B / peak bandwidth). Its arithmetic intensity I = F / B (FLOP per byte) decides which bound
applies: below the ridge point I* = peak FLOP/s / peak bandwidth the op is memory-bound, above it
compute-bound. Attainable FLOP/s = min(peak FLOP/s, I · bandwidth).

Byte counts here assume each input is read from device memory once and each output written once
(what a fused kernel achieves, caches aside). `count_traffic` instead runs eager PyTorch code under a
dispatch mode and adds up every op's inputs and outputs, since each eager op is its own kernel that
reads its inputs from memory and writes its result back. Run it on `meta` tensors to count the
traffic of LLaMA-7B-sized shapes without allocating or computing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..evaluate import best_time

# --- peak numbers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth_gbps: float  # peak DRAM bandwidth, GB/s (1e9 bytes/s), vendor datasheet
    fp16_tflops: float | None  # dense fp16 tensor-core peak with fp32 accumulate (no sparsity); None: not listed

    @property
    def ridge(self) -> float | None:
        """FLOP per byte above which an op is compute-bound."""
        return None if self.fp16_tflops is None else self.fp16_tflops * 1e12 / (self.bandwidth_gbps * 1e9)


# Matched by substring of torch.cuda.get_device_name, most specific first ("GH200" before "H200",
# "A100" before "A10", "L40S" before "L4"). FLOP/s: NVIDIA datasheets' dense fp16 tensor figures (half the "with
# sparsity" number where only that is printed); None where the datasheet gives no such figure.
GPUS = [
    GPU("GH200", 4000, 989),
    GPU("H200", 4800, 989),
    GPU("H100 NVL", 3900, None),
    GPU("H100 PCIe", 2000, 756),
    GPU("H100", 3350, 989),
    GPU("A100-SXM4-80GB", 2039, 312),
    GPU("A100 80GB PCIe", 1935, 312),
    GPU("A100", 1555, 312),
    GPU("L40S", 864, None),
    GPU("L40", 864, None),
    GPU("L4", 300, 121),
    GPU("A10G", 600, None),
    GPU("A10", 600, 125),
    GPU("T4", 320, 65),
    GPU("V100", 900, 125),
    GPU("RTX 4090", 1008, 165),
    GPU("RTX 3090", 936, 71),
    GPU("A6000", 768, 155),
]


def device_peak(name: str) -> GPU | None:
    """The GPUS entry whose key occurs in `name` (a torch.cuda.get_device_name string), or None."""
    return next((g for g in GPUS if g.name in name), None)


def attainable(intensity: float, bandwidth_gbps: float, peak_tflops: float) -> float:
    """Roofline: the most FLOP/s an op of this intensity (FLOP/byte) can reach."""
    return min(peak_tflops * 1e12, intensity * bandwidth_gbps * 1e9)


# --- costs of a Llama decoder's ops, from the shapes -----------------------------------------------------


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def seconds(self, bandwidth_gbps: float, peak_tflops: float | None = None) -> float:
        """The roofline's lower bound on this op's time."""
        t = self.bytes / (bandwidth_gbps * 1e9)
        return t if peak_tflops is None else max(t, self.flops / (peak_tflops * 1e12))


def w4a16_bytes_per_weight(group_size: int, scale_bytes: int = 2, zero_bytes: int = 2) -> float:
    """0.5 byte of code per weight, plus one scale and one zero point per group of `group_size`."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be a positive number of input columns.")
    return 0.5 + (scale_bytes + zero_bytes) / group_size


def linear_cost(
    tokens: int, out_features: int, in_features: int, act_bytes: int = 2, weight_bytes: float = 2.0
) -> Cost:
    """y [tokens, out] = x [tokens, in] · Wᵀ: 2·tokens·out·in FLOP (a multiply and an add per weight per
    token); reads x and W (weight_bytes per weight), writes y."""
    flops = 2 * tokens * out_features * in_features
    nbytes = out_features * in_features * weight_bytes + (tokens * in_features + tokens * out_features) * act_bytes
    return Cost(flops, nbytes)


# FLOP per element for the elementwise ops (a convention: exp and division count as one each):
RMS_NORM_FLOPS = 5  # residual add, square, sum, scale by 1/rms, multiply by the weight
SILU_AND_MUL_FLOPS = 4  # exp(-g), 1 + ., g / ., · up


def rms_norm_cost(tokens: int, hidden: int, act_bytes: int = 2, residual: bool = True) -> Cost:
    """Fused RMSNorm (+ residual add): reads x (and the residual) and the weight, writes y (and x + residual)."""
    n = tokens * hidden
    return Cost(RMS_NORM_FLOPS * n, ((4 if residual else 2) * n + hidden) * act_bytes)


def silu_and_mul_cost(tokens: int, intermediate: int, act_bytes: int = 2) -> Cost:
    """Fused SiLU(gate) · up: reads gate and up, writes the product."""
    n = tokens * intermediate
    return Cost(SILU_AND_MUL_FLOPS * n, 3 * n * act_bytes)


def attention_cost(
    batch: int, new_tokens: int, context: int, heads: int, kv_heads: int, head_dim: int, act_bytes: int = 2
) -> Cost:
    """Attention of `new_tokens` queries per sequence over `context` positions (the new ones included),
    FlashAttention-style (Q, K, V read once, O written once). Decode: new_tokens = 1. Prefill:
    new_tokens = context, causal, so about half the score matrix is computed."""
    pairs = new_tokens * context if new_tokens == 1 else new_tokens * (context + 1) / 2
    flops = batch * 4 * heads * head_dim * pairs  # q·k and p·v: 2 FLOP each per pair per dimension
    nbytes = batch * act_bytes * head_dim * (2 * heads * new_tokens + 2 * kv_heads * context)
    return Cost(flops, nbytes)


def _config_dims(config) -> tuple[int, int, int, int, int]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return hidden, heads, kv_heads, head_dim, config.intermediate_size


def decoder_layer_costs(
    config, tokens: int, context: int | None = None, batch: int = 1, act_bytes: int = 2, weight_bytes: float = 2.0
) -> dict[str, Cost]:
    """The ops of one Llama decoder layer, fused as vLLM fuses them (merged qkv and gate_up projections).

    Decode: tokens = 1 new token for each of `batch` sequences with `context` positions each.
    Prefill: tokens = context = the prompt length, batch = 1 (pass context=None for that).
    weight_bytes: 2 for fp16, w4a16_bytes_per_weight(g) for 4-bit weights."""
    hidden, heads, kv_heads, head_dim, inter = _config_dims(config)
    if tokens < 1 or batch < 1:
        raise ValueError(f"tokens={tokens}, batch={batch}: both must be >= 1.")
    decode = context is not None and tokens == 1
    context = context if context is not None else tokens
    rows = batch * tokens  # rows of every activation matrix
    lin = dict(act_bytes=act_bytes, weight_bytes=weight_bytes)
    return {
        "rms_norm + residual": rms_norm_cost(rows, hidden, act_bytes),
        "qkv_proj": linear_cost(rows, (heads + 2 * kv_heads) * head_dim, hidden, **lin),
        "attention": attention_cost(batch, 1 if decode else tokens, context, heads, kv_heads, head_dim, act_bytes),
        "o_proj": linear_cost(rows, hidden, heads * head_dim, **lin),
        "rms_norm + residual (2)": rms_norm_cost(rows, hidden, act_bytes),
        "gate_up_proj": linear_cost(rows, 2 * inter, hidden, **lin),
        "silu_and_mul": silu_and_mul_cost(rows, inter, act_bytes),
        "down_proj": linear_cost(rows, hidden, inter, **lin),
    }


def decode_step_cost(
    config, batch: int, context: int, act_bytes: int = 2, weight_bytes: float = 2.0, lm_head_bytes: float = 2.0
) -> Cost:
    """Every layer plus the final norm and the output layer (kept in 16 bits) for one decode step."""
    layer = sum(decoder_layer_costs(config, 1, context, batch, act_bytes, weight_bytes).values(), Cost(0, 0))
    hidden = config.hidden_size
    head = linear_cost(batch, config.vocab_size, hidden, act_bytes, lm_head_bytes)
    norm = rms_norm_cost(batch, hidden, act_bytes, residual=False)
    return Cost(layer.flops * config.num_hidden_layers, layer.bytes * config.num_hidden_layers) + head + norm


# --- traffic of eager PyTorch, counted -----------------------------------------------------------------


@dataclass
class OpTraffic:
    op: str  # e.g. "aten.mul.Tensor"
    read: int  # bytes of its tensor inputs
    written: int  # bytes of its tensor outputs
    shapes: str  # "[2, 8] f16, [8] f16 -> [2, 8] f16"

    @property
    def total(self) -> int:
        return self.read + self.written


_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "bool",
}


def footprint(t: torch.Tensor) -> int:
    """Bytes of memory a tensor's elements occupy: a broadcast (stride-0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size() if t.numel() else 0


def _describe(tensors) -> str:
    return ", ".join(f"{list(t.shape)} {_SHORT.get(t.dtype, str(t.dtype)[6:])}" for t in tensors)


class _TrafficMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[OpTraffic] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if inputs and outputs and not is_view:  # factories (no input) and views move no data
            self.ops.append(
                OpTraffic(
                    str(func),
                    sum(footprint(t) for t in inputs),
                    sum(footprint(t) for t in outputs),
                    f"{_describe(inputs)} -> {_describe(outputs)}",
                )
            )
        return out


def count_traffic(fn, *args, **kwargs) -> list[OpTraffic]:
    """Run fn(*args, **kwargs) and list every PyTorch op it dispatched, with the bytes it read and wrote.

    In eager mode each op is one kernel launch (on a GPU) that reads its inputs from device memory and
    writes its outputs there, so the sum is the traffic of the unfused code. Views (slicing, reshape,
    transpose) move nothing and are left out; a broadcast input counts its distinct elements.
    Works on `meta` tensors: shapes propagate, nothing is computed."""
    mode = _TrafficMode()
    with torch.no_grad(), mode:
        fn(*args, **kwargs)
    return mode.ops


def io_bytes(fn, *args, **kwargs) -> int:
    """Bytes of fn's tensor arguments plus bytes of its tensor results: the traffic of one kernel that
    reads every input once and writes every output once (a fused kernel's ideal). Meta tensors work."""
    with torch.no_grad():
        out = fn(*args, **kwargs)
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    return sum(footprint(t) for t in tensors)


# --- timing -------------------------------------------------------------------------------------------------


def time_ms(fn, device="cpu", repeats: int = 5, rep_ms: int = 100) -> float:
    """Milliseconds per call of fn(). CUDA: triton.testing.do_bench's median over about rep_ms of
    calls (it flushes the L2 cache before each). CPU: the fastest of `repeats` calls after one warm-up,
    the one least disturbed by other work on the machine."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    return 1e3 * best_time(fn, repeats, warmup=1)


def copy_bandwidth_gbps(device="cpu", nbytes: int = 256 * 2**20) -> float:
    """Measured device-memory bandwidth of a plain copy (bytes read + bytes written per second), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device="cpu", n: int = 1024, dtype=torch.float32) -> float:
    """Measured FLOP/s (in TFLOP/s) of an n x n x n matrix product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12
