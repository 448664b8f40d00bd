"""Fast tests of labkit.quant on small random matrices and the 2-layer random Llama."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from labkit import evaluate, models, walk
from labkit.quant import checkpoint, formats
from labkit.quant import pack as packing
from labkit.quant.gptq import GPTQResult, gptq, gptq_quantize_weight
from labkit.quant.qlinear import QuantLinear, quant_linears
from labkit.quant.rtn import rtn
from labkit.threads import num_threads

BITS = (2, 3, 4, 8)


def fresh():
    return models.load("tiny-llama-random", device="cpu")[0]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def correlated_inputs(in_features, tokens=512, seed=0):
    """X [tokens, in]: correlated channels with a few large ones, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / math.sqrt(in_features)
    x = torch.randn(tokens, in_features, generator=g) @ (torch.eye(in_features) + 2 * mix)
    x[:, :: max(1, in_features // 8)] *= 8  # outlier channels
    return x


def layer_error(W, W_hat, X):  # ‖W X − Ŵ X‖², X as [tokens, in]
    return ((X @ (W - W_hat).T) ** 2).sum().item()


# --- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (2, 3, 7), (64, 33)])
def test_pack_roundtrip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    data = packing.pack(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(math.prod(shape) * bits / 8)
    assert torch.equal(packing.unpack(data, bits, shape), codes)
    if bits < 8:  # the byte-wise fast paths agree with the general chunked unpacker
        assert torch.equal(packing._unpack_stream(data, bits, codes.numel()), codes.reshape(-1))


def test_pack_layout():
    assert packing.pack(torch.tensor([1, 2]), 4).tolist() == [0x21]  # low nibble first
    assert packing.pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert packing.pack(torch.tensor([7] * 8), 3).tolist() == [255, 255, 255]  # 8 values in 3 bytes
    assert packing.pack(torch.tensor([0, 0, 7]), 3).tolist() == [0b11000000, 0b00000001]  # value 2 straddles


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing loop (qlinear_cuda_old.QuantLinear.pack), copied for comparison."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", BITS)
def test_pack_int32_matches_autogptq(bits):
    codes = torch.randint(0, 2**bits, (64, 5), dtype=torch.uint8)  # [in, out]
    words = packing.pack_int32(codes, bits, dim=0)
    assert words.shape == (64 * bits // 32, 5) and words.dtype == torch.int32
    assert np.array_equal(words.numpy(), autogptq_pack_rows(codes.numpy(), bits))
    assert torch.equal(packing.unpack_int32(words, bits, 0, 64), codes)
    cols = packing.pack_int32(codes.T.contiguous(), bits, dim=1)  # along dim 1, as qzeros
    assert torch.equal(cols, words.T) and torch.equal(packing.unpack_int32(cols, bits, 1, 64), codes.T)


# --- grids ------------------------------------------------------------------------------------------


def on_grid(bits, out=6, n_groups=4, gs=8, seed=0):
    """W exactly on an asymmetric integer grid: each group holds codes 0 and maxq, fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (out, n_groups, gs), generator=g)
    q[..., 0], q[..., 1] = 0, maxq  # the group's range is exactly [code 0, code maxq]
    scale = (torch.rand(out, n_groups, 1, generator=g) * 0.1 + 0.01).half().float()
    zero = torch.randint(0, maxq + 1, (out, n_groups, 1), generator=g).float()
    return (scale * (q - zero)).reshape(out, -1), q.reshape(out, -1)


@pytest.mark.parametrize("bits", BITS)
def test_rtn_exact_on_grid(bits):
    w, q = on_grid(bits)
    codes, scale, zero = formats.quantize(w, bits, group_size=8)
    assert torch.equal(codes.long(), q) and torch.equal(formats.dequantize(codes, scale, zero, 8), w)
    row, _ = on_grid(bits, n_groups=1, gs=32)  # per channel
    assert torch.equal(formats.fake_quantize(row, bits), row)
    # the float-offset grid is exact on its own grid too (fp16 scale and offset, as GGUF stores them)
    w = offset_grid(bits, in_features=64, block=8)
    assert torch.equal(formats.fake_quantize(w, bits, 8, float_offset=True), w)


def test_granularities_and_sym():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    errs = {}
    for name, kw in {"tensor": dict(per_tensor=True), "channel": {}, "g16": dict(group_size=16)}.items():
        codes, scale, zero = formats.quantize(w, 4, **kw)
        assert scale.shape == {"tensor": (1, 1), "channel": (16, 1), "g16": (16, 4)}[name]
        errs[name] = (formats.dequantize(codes, scale, zero, kw.get("group_size")) - w).pow(2).sum().item()
    assert errs["g16"] < errs["channel"] < errs["tensor"]  # finer scales, smaller error
    codes, scale, zero = formats.quantize(w, 4, sym=True)
    assert (zero == 8).all()  # symmetric: fixed zero point 2^(bits-1), the GPTQ reference's convention
    assert torch.allclose(scale[:, 0].float(), (2 * w.abs().amax(1) / 15).half().float())


def test_group_size_must_divide_in_features():
    # SmolLM2's 576 inputs are 4.5 × 128: g128 would leave a short last group; labkit refuses it, by name
    w = torch.randn(4, 80, generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=80.*such as 16"):
        formats.quantize(w, 4, group_size=32)
    with pytest.raises(ValueError, match="group_size=32 does not divide in_features=80"):
        gptq_quantize_weight(w, torch.eye(80), 4, 32)
    with pytest.raises(ValueError, match="group_size=32 does not divide in_features=80"):
        QuantLinear.from_linear(nn.Linear(80, 4), 4, group_size=32)
    codes, scale, zero = formats.quantize(w, 4, group_size=16)
    with pytest.raises(ValueError, match="pass the group_size"):
        formats.dequantize(codes, scale, zero)
    # a whole model: refused before any layer changes. The tiny model's attention and MLP inputs are 64 wide,
    # down_proj's 160: g64 fits every layer but the last one quantized
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for quantize_model in (lambda: rtn(model, 4, 64), lambda: gptq(model, torch.zeros(1, 8, dtype=torch.long), 4, 64)):
        with pytest.raises(ValueError, match="group_size=64 does not divide in_features=160"):
            quantize_model()
        assert not quant_linears(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def offset_grid(bits=4, out=8, in_features=128, block=32, seed=0):
    """A matrix as GGUF Q4_1 stores it (bits=4, block=32): ŵ = d·q + m per block, d and m in fp16."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    blocks = in_features // block
    q = torch.randint(0, maxq + 1, (out, blocks, block), generator=g)
    q[..., 0], q[..., 1] = 0, maxq  # Q4_1 maps each block's min to code 0 and its max to code 15
    d = (torch.rand(out, blocks, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-d * maxq / 2 + torch.randn(out, blocks, 1, generator=g) * 0.005).half().float()  # not a multiple of d
    return (d * q + m).reshape(out, in_features)


def test_float_offset_reproduces_q4_1_but_integer_zero_does_not():
    w = offset_grid()
    float_offset = formats.fake_quantize(w, 4, 32, float_offset=True)
    assert torch.equal(float_offset, w)  # bit for bit
    integer_zero = formats.fake_quantize(w, 4, 32)
    assert (integer_zero != w).float().mean() > 0.5  # the integer grid is shifted: most weights move
    assert (integer_zero - w).abs().max() > 1e-4


def test_nf4_fp4_and_fp8():
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    for grid in (formats.NF4, formats.FP4):
        codes, absmax = formats.quantize_lut(w, grid, block_size=64)
        w_hat = formats.dequantize_lut(codes, absmax, grid)
        gap = (grid[1:] - grid[:-1]).max()
        assert ((w_hat - w).abs() <= gap / 2 * absmax.repeat_interleave(64, 1) + 1e-6).all()
        exact = grid[codes.long()] * absmax.repeat_interleave(64, 1)  # values on the grid come back exactly
        assert torch.allclose(formats.dequantize_lut(*formats.quantize_lut(exact, grid, 64), grid), exact)
    # FP8: the plain-torch reference equals torch's float8 casts (exact: both round to nearest even),
    # over normal, subnormal and tie values; and both saturate at the largest finite value.
    x = torch.cat(
        [
            torch.randn(2000) * 10.0 ** torch.randint(-4, 4, (2000,)).float(),
            torch.tensor([0.0, 2.0**-9, 3 * 2.0**-10, 1.0625, 1.1875, 500.0, -1e6]),
        ]
    )
    for fmt, maxval in (("e4m3", 448.0), ("e5m2", 57344.0)):
        assert torch.equal(formats.fp8_round_reference(x, fmt), formats.fp8_round(x, fmt))
        assert formats.fp8_round(torch.tensor([1e9]), fmt).item() == maxval
    assert formats.fp8_round(torch.tensor([1.0625]), "e4m3").item() == 1.0  # tie: to the even mantissa
    values, scale = formats.quantize_fp8(w, "e4m3")
    assert (values.abs().amax(1) == 448).all() and torch.allclose(values * scale, w, rtol=0.07)


# --- GPTQ on one layer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,blocksize", [(4, None, 128), (3, None, 16), (4, 16, 32), (3, 32, 24), (4, 24, 40)]
)  # groups that straddle lazy blocks
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_error(bits, group_size, blocksize, act_order):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 96, generator=g)
    X = correlated_inputs(96)
    hessian = walk.Hessian(96)
    hessian.add(X)
    result = gptq_quantize_weight(W, hessian.H, bits, group_size, act_order=act_order, blocksize=blocksize)
    Wq, codes, scales, zeros, g_idx = result.weight, result.codes, result.scales, result.zeros, result.g_idx
    rtn_error = layer_error(W, formats.fake_quantize(W, bits, group_size), X)
    assert layer_error(W, Wq, X) < 0.8 * rtn_error
    # the returned pieces describe Wq exactly, also with act-order's unsorted g_idx
    assert torch.equal(formats.dequantize(codes, scales, zeros, g_idx=g_idx), Wq)
    n_groups = 1 if group_size is None else 96 // group_size
    assert scales.shape == zeros.shape == (48, n_groups) and g_idx.shape == (96,)
    assert (torch.bincount(g_idx.long(), minlength=n_groups) == 96 // n_groups).all()  # equal groups
    if act_order and group_size:
        assert not torch.equal(g_idx.long(), torch.arange(96) // group_size)  # groups follow diag(H) order


def test_gptq_dead_columns_and_act_order_helps():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=g)
    X = correlated_inputs(64)
    X[:, 5] = 0  # an input that never fires
    H = 2 * X.T @ X / X.shape[0]
    Wq = gptq_quantize_weight(W, H, 4).weight
    assert (Wq[:, 5] == 0).all()
    errors = [layer_error(W, gptq_quantize_weight(W, H, 3, act_order=a).weight, X) for a in (False, True)]
    assert errors[1] < errors[0]


# --- QuantLinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(group_size=None),
        dict(group_size=16),
        dict(group_size=16, float_offset=True),
        dict(group_size=32, sym=True),
        dict(group_size=8),
    ],
)
def test_quantlinear_forward_equals_dense(bits, kw):
    torch.manual_seed(5)
    linear = nn.Linear(64, 24, bias=True)
    ql = QuantLinear.from_linear(linear, bits, **kw)
    x = torch.randn(3, 7, 64)
    w_hat = formats.fake_quantize(linear.weight.data, bits, **kw)
    assert torch.equal(ql.dequantized_weight(), w_hat)
    assert torch.equal(ql(x), nn.functional.linear(x, w_hat, linear.bias))
    assert torch.equal(ql.to_float()(x), ql(x))


def test_quantlinear_act_order_and_stored_bytes():
    W = torch.randn(32, 64)
    H = walk.Hessian(64)
    H.add(correlated_inputs(64))
    r = gptq_quantize_weight(W, H.H, 4, 16, act_order=True)
    ql = QuantLinear.from_codes(r.codes, r.scales, r.zeros, 4, 16, g_idx=r.g_idx)
    assert ql.g_idx is not None and torch.equal(ql.dequantized_weight(), r.weight)
    # 4-bit, group 128 (GPTQ's usual setting): bytes ≈ 4 bits per weight + an fp16 scale per group
    ql = QuantLinear.from_linear(nn.Linear(1024, 256, bias=False), 4, group_size=128)
    expected = 256 * 1024 * 4 / 8 + 256 * (1024 // 128) * 2
    assert abs(evaluate.weight_bytes(ql) - expected) / expected < 0.05
    assert evaluate.weight_bytes(nn.Sequential(ql)) == ql.stored_bytes()


# --- whole model: RTN and GPTQ --------------------------------------------------------------------


def test_rtn_model(tiny, calibration):
    model = tiny
    dense_bytes = evaluate.weight_bytes(model)
    linear_bytes = sum(
        p.numel() * 4 for layer in model.model.layers for p in (m.weight for m in models.linear_layers(layer).values())
    )
    packed, fake = fresh(), fresh()
    report = rtn(packed, 4, group_size=32)
    rtn(fake, 4, group_size=32, pack=False)
    assert report.layers == 14 and len(quant_linears(packed)) == 14 and not quant_linears(fake)
    assert isinstance(packed.lm_head, nn.Linear) and not isinstance(packed.lm_head, QuantLinear)
    assert torch.equal(logits(packed, calibration), logits(fake, calibration))
    stored = sum(m.stored_bytes() for m in quant_linears(packed).values())
    assert evaluate.weight_bytes(packed) == dense_bytes - linear_bytes + stored
    assert stored < linear_bytes / 6  # 4.5 bits instead of 32


@pytest.mark.parametrize("kw", [dict(group_size=None), dict(group_size=32, act_order=True, sym=True)])
def test_gptq_model(calibration, kw):
    packed, fake = fresh(), fresh()
    report = gptq(packed, calibration, 4, **kw)
    gptq(fake, calibration, 4, pack=False, **kw)
    assert report.layers == 14 and len(report.errors) == 14 and all(e >= 0 for e in report.errors.values())
    assert torch.equal(logits(packed, calibration), logits(fake, calibration))
    assert any(m.g_idx is not None for m in quant_linears(packed).values()) == kw.get("act_order", False)


# --- checkpoints --------------------------------------------------------------------------------


def test_save_load_quantized(tmp_path, calibration):
    model = fresh()
    gptq(model, calibration, 3, group_size=32, act_order=True)
    path = checkpoint.save_quantized(model, tmp_path / "q.safetensors")
    loaded = checkpoint.load_quantized(fresh(), path)
    for name, m in quant_linears(model).items():
        other = loaded.get_submodule(name)
        assert isinstance(other, QuantLinear)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    assert torch.equal(logits(loaded, calibration), logits(model, calibration))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_quantized(model, path)
    checkpoint.save_quantized(model, path, overwrite=True)

    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        checkpoint.load_quantized(fresh(), tmp_path / "short.safetensors")
    tampered = bytearray(data)
    tampered[-10] ^= 0xFF  # one flipped byte in the tensor data
    (tmp_path / "bad.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_quantized(fresh(), tmp_path / "bad.safetensors")

    other = fresh()
    other.model.layers[0].mlp.up_proj = nn.Linear(64, 96, bias=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        checkpoint.load_quantized(other, path)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    "bits,kw",
    [
        (4, dict(group_size=32, sym=True)),
        (3, dict(group_size=32, act_order=True)),
        (2, dict(group_size=None)),
        (4, dict(group_size=16, act_order=True)),
    ],
)
def test_gptq_layout_roundtrip(tmp_path, calibration, fmt, bits, kw):
    model = fresh()
    gptq(model, calibration, bits, **kw)
    folder = checkpoint.save_gptq(model, tmp_path / "ckpt", format=fmt)
    config = __import__("json").loads((folder / "quantize_config.json").read_text())
    assert config["bits"] == bits and config["desc_act"] == kw.get("act_order", False)
    assert config["group_size"] == (kw["group_size"] or -1) and config["checkpoint_format"] == fmt
    loaded = checkpoint.load_gptq(fresh(), folder)
    for name, m in quant_linears(model).items():
        other = loaded.get_submodule(name)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    assert torch.equal(logits(loaded, calibration), logits(model, calibration))
    tensors = checkpoint._read_safetensors(folder / "model.safetensors")[0]
    qzeros = tensors["model.layers.0.self_attn.q_proj.qzeros"]
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * bits // 32, 64)
    assert tensors["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    if kw.get("sym"):  # zero point 8 stored as 7 (v1, AutoGPTQ's zero − 1) or as 8 (v2)
        word = 0x77777777 if fmt == "gptq" else 0x88888888 - 2**32
        assert (qzeros == word).all()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_gptq(model, folder)


def test_gptq_layout_refuses_zero_point_zero(tmp_path):
    model = fresh()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight.data[:, :32] = layer.weight.data[:, :32].abs()  # a positive group: zero point 0
    rtn(model, 4, group_size=32)
    with pytest.raises(ValueError, match="gptq_v2"):
        checkpoint.save_gptq(model, tmp_path / "v1")
    checkpoint.save_gptq(model, tmp_path / "v2", format="gptq_v2")


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        formats.quantize(w, 5)
    with pytest.raises(ValueError, match="group_size=0: use None"):
        formats.quantize(w, 4, group_size=0)
    with pytest.raises(ValueError, match="block_size=48 does not divide in_features=64"):
        formats.quantize_lut(w, formats.NF4, block_size=48)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        formats.quantize(bad, 4)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize_weight(bad, torch.eye(64), 4)
    with pytest.raises(ValueError, match="floating-point matrix"):
        formats.quantize(torch.randn(64), 4)
    with pytest.raises(ValueError, match="contradict"):
        formats.quantize(w, 4, sym=True, float_offset=True)
    model = fresh()
    model.model.layers[0].post_attention_layernorm.weight.data[3] = float("nan")  # NaN into the MLP's inputs
    with pytest.raises(ValueError, match=r"layers.0.post_attention_layernorm.weight holds non-finite"):
        gptq(model, torch.randint(0, 256, (2, 8)), 4)  # found before anything changes
    model = fresh()  # NaN activations from finite weights (a hook stands in for an overflow): found midway
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(ValueError, match=r"activations entering layers.0.mlp.gate_proj hold non-finite"):
        gptq(model, torch.randint(0, 256, (2, 8)), 4)
    with pytest.raises(ValueError, match=r"H must be a finite \[64, 64\]"):
        gptq_quantize_weight(w, torch.eye(32), 4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        packing.pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="do not hold"):
        packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, (8,))
    with pytest.raises(ValueError, match="fmt='e3m4'"):
        formats.fp8_round(w, "e3m4")
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack_int32(torch.zeros(48, 4, dtype=torch.uint8), 4, dim=0)


def test_gptq_result_is_named_and_threads_are_the_callers():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    H = walk.Hessian(64)
    H.add(correlated_inputs(64))
    before = torch.get_num_threads()
    result = gptq_quantize_weight(W, H.H, 4, 16)
    assert isinstance(result, GPTQResult) and isinstance(result.loss, float) and result.loss > 0
    assert result.weight.shape == result.codes.shape == (32, 64) and result.scales.shape == (32, 4)
    assert torch.get_num_threads() == before  # threads=1 (the default) only while the call runs
    with num_threads(1):  # threads=None leaves the caller's setting: same bits on one thread
        assert torch.equal(gptq_quantize_weight(W, H.H, 4, 16, threads=None).weight, result.weight)
    with pytest.raises(ValueError, match="threads=0"):
        gptq_quantize_weight(W, H.H, 4, 16, threads=0)
    with pytest.raises(TypeError):  # options are keyword-only
        gptq_quantize_weight(W, H.H, 4, 16, False)
