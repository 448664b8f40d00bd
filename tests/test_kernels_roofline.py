"""labkit.kernels.roofline: costs from shapes, traffic counted from eager code, the GPU table."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from labkit.kernels import rms_norm_torch, roofline, swiglu_torch, w4a16_matmul_torch
from labkit.rehearsal import llama_7b_config

META = dict(device="meta", dtype=torch.float16)


def test_linear_cost_and_intensity():
    c = roofline.linear_cost(1, 4096, 4096)  # fp16 GEMV: 2 FLOP per 2-byte weight
    assert c.flops == 2 * 4096 * 4096
    assert c.bytes == 2 * (4096 * 4096 + 2 * 4096)
    assert abs(c.intensity - 1.0) < 1e-3
    w4 = roofline.linear_cost(1, 4096, 4096, weight_bytes=roofline.w4a16_bytes_per_weight(128))
    assert 3.7 < c.bytes / w4.bytes < 3.8  # 2 / (0.5 + 4/128)
    assert roofline.w4a16_bytes_per_weight(32, 4, 4) == 0.75
    with pytest.raises(ValueError, match="group_size=0"):
        roofline.w4a16_bytes_per_weight(0)


def test_gpu_table_and_roofline():
    assert roofline.device_peak("NVIDIA A100-SXM4-80GB").bandwidth_gbps == 2039
    assert roofline.device_peak("NVIDIA A10").bandwidth_gbps == 600  # not the A100's entry
    assert roofline.device_peak("NVIDIA GH200 480GB").name == "GH200"  # not the H200's
    assert roofline.device_peak("NVIDIA L40S").name == "L40S"
    assert roofline.device_peak("Some future GPU") is None
    a100 = roofline.device_peak("A100-SXM4-80GB")
    assert abs(a100.ridge - 312e12 / 2039e9) < 1e-9
    assert roofline.attainable(1.0, 2039, 312) == 2039e9  # memory roof
    assert roofline.attainable(1e4, 2039, 312) == 312e12  # compute roof


def test_decoder_costs_decode_is_memory_bound_prefill_compute_bound():
    cfg = llama_7b_config()
    ridge = roofline.device_peak("A100-SXM4-80GB").ridge
    decode = roofline.decoder_layer_costs(cfg, tokens=1, context=2048)
    prefill = roofline.decoder_layer_costs(cfg, tokens=2048)
    for op in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert decode[op].intensity < 1.01 and prefill[op].intensity > ridge
    assert decode["attention"].intensity == pytest.approx(1.0, rel=1e-3)  # MHA decode: 1 FLOP per fp16 byte
    for op in ("rms_norm + residual", "silu_and_mul"):
        assert prefill[op].intensity < 1
    gqa = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    )
    assert roofline.decoder_layer_costs(gqa, 1, 512)["attention"].intensity == pytest.approx(3.0, rel=1e-2)
    step = roofline.decode_step_cost(cfg, batch=1, context=2048)
    assert 14.0e9 < step.bytes < 14.5e9  # 6.7 G fp16 weights + 1 GiB of KV cache + the output layer


def test_count_traffic_of_eager_rms_norm():
    x, w = torch.empty(16, 4096, **META), torch.empty(4096, **META)
    ops = roofline.count_traffic(rms_norm_torch, x, w, 1e-6, x)
    names = [op.op for op in ops]
    assert names == [
        "aten.add.Tensor",
        "aten._to_copy.default",
        "aten.pow.Tensor_Scalar",
        "aten.mean.dim",
        "aten.add.Tensor",
        "aten.rsqrt.default",
        "aten.mul.Tensor",
        "aten._to_copy.default",
        "aten.mul.Tensor",
    ]
    n = 16 * 4096
    assert ops[0].read == 2 * n * 2 and ops[0].written == n * 2  # fp16 add
    assert ops[1].written == 4 * n  # the fp32 upcast
    fused = roofline.io_bytes(rms_norm_torch, x, w, 1e-6, x)
    assert fused == (4 * n + 4096) * 2  # read x, residual, weight; write y and h


def test_count_traffic_skips_views_and_counts_broadcasts_once():
    gate_up = torch.empty(8, 64, **META)
    ops = roofline.count_traffic(lambda t: swiglu_torch(t[:, :32], t[:, 32:]), gate_up)
    assert [op.op for op in ops] == ["aten.silu.default", "aten.mul.Tensor"]  # the slices move nothing
    q = torch.empty(32, 16, device="meta", dtype=torch.uint8)
    s = torch.empty(32, 1, **META)
    ops = roofline.count_traffic(w4a16_matmul_torch, torch.empty(1, 32, **META), q, s, s, 32)
    clones = [op for op in ops if op.op == "aten.clone.default"]  # repeat_interleave of the scales
    assert clones and all(op.read == 32 * 1 * 4 for op in clones)  # reads 32 fp32 scales, not 32 x 32
    assert sum(
        op.total for op in roofline.count_traffic(F.linear, torch.empty(1, 32, **META), torch.empty(48, 32, **META))
    ) == 2 * (32 + 48 * 32 + 48)


def test_count_traffic_on_real_tensors_and_timing():
    x = torch.randn(4, 8)
    ops = roofline.count_traffic(torch.add, x, x)
    assert len(ops) == 1 and ops[0].read == 2 * 32 * 4 and ops[0].written == 32 * 4
    assert roofline.time_ms(lambda: x + x, "cpu", repeats=2) > 0
    assert roofline.copy_bandwidth_gbps("cpu", nbytes=2**20) > 0
