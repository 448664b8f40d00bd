"""Activation quantization and QLoRA storage: int8 arithmetic, LLM.int8(), SmoothQuant + W8A8, NF4 + DQ."""

import copy
import math

import pytest
import torch
from torch import nn

from labkit import evaluate, quant, walk
from labkit.quant.int8 import Int8Linear, absmax_quantize, int8_matmul, int8_matmul_reference, matmul_path
from labkit.quant.nf4 import NF4Linear, double_dequantize, double_quantize, dynamic_map


def _linear(out_features=24, in_features=32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    lin.weight.data = torch.randn(out_features, in_features, generator=g) * 0.1
    if bias:
        lin.bias.data = torch.randn(out_features, generator=g)
    return lin


def _activations(tokens=16, features=32, outlier=5, size=60.0, seed=1):
    # x: [tokens, features], feature `outlier` systematically large in every token (as in LLMs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, outlier] *= size
    return x


# --- int8 arithmetic ---------------------------------------------------------------------------


def test_absmax_quantize_error_is_at_most_half_a_step():
    x = _activations()
    q, scale = absmax_quantize(x, dim=1)  # per token
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    assert q.abs().amax(1).eq(127).all()  # each row's largest |x| maps to 127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()
    q, scale = absmax_quantize(torch.zeros(2, 3))
    assert q.eq(0).all() and scale.eq(1).all()  # zero rows: no 0/0


def test_int8_matmul_is_exact_and_uses_int_mm_on_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 40), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().T
    assert torch.equal(int8_matmul_reference(a, b).long(), exact)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), exact)
    if hasattr(torch, "_int_mm"):
        assert matmul_path() == "torch._int_mm (cpu)"
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(a.float(), b)


def test_w8a8_and_w8a16_layers_match_float_within_int8_tolerance():
    lin = _linear(bias=True)
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(2))
    ref = lin(x)
    for act in ("float", "per-token"):
        q = Int8Linear.from_linear(lin, act)
        y = q(x)
        assert y.shape == ref.shape
        # each int8 rounding is <= half a step of 1/127 of the row's max: relative error well under 2%
        assert (y - ref).norm() / ref.norm() < 0.02
    q = Int8Linear.from_linear(lin, "per-token")
    assert q.stored_bytes() == 24 * 32 + 4 * 24 + 4 * 24  # int8 W + fp32 row scales + fp32 bias
    # W8A16 is exactly the float matmul with the dequantized weight
    w16 = Int8Linear.from_linear(lin, "float")
    assert torch.allclose(w16(x), x @ w16.dequantized_weight().T + lin.bias, atol=1e-6)


# --- LLM.int8() -----------------------------------------------------------------------------------


def test_llm_int8_handles_outlier_features_exactly():
    lin = _linear()
    q = Int8Linear.from_linear(lin, "llm.int8", threshold=6.0)
    w_hat = q.dequantized_weight()  # the int8 weights, dequantized
    # only outlier features nonzero: the whole product goes through the float path, exactly
    x = torch.zeros(4, 32)
    x[:, 5] = torch.tensor([50.0, -70.0, 8.0, 6.0])  # 6.0 == threshold counts (|x| >= threshold)
    x[:, 9] = torch.tensor([0.0, 0.0, -9.0, 0.0])
    assert torch.allclose(q(x), x @ w_hat.T, rtol=1e-6, atol=1e-6)
    assert q.outlier_seen.nonzero()[:, 0].tolist() == [5, 9]
    # mixed input: close to the float matmul with the same weights; far better than plain per-token W8A8
    x = _activations(size=60.0)
    ref = x @ w_hat.T
    q.outlier_seen.zero_()
    err_mixed = ((q(x) - ref).norm() / ref.norm()).item()
    err_w8a8 = ((Int8Linear.from_linear(lin, "per-token")(x) - ref).norm() / ref.norm()).item()
    assert err_mixed < 0.01 and err_mixed < err_w8a8 / 5
    assert q.outlier_seen.nonzero()[:, 0].tolist() == [5]
    # the decomposition's int8 part is the per-token int8 matmul of the non-outlier features
    regular = x.clone()
    regular[:, 5] = 0
    int8_part = Int8Linear.from_linear(lin, "per-token")(regular)
    assert torch.allclose(q(x), int8_part + x[:, 5:6] @ w_hat[:, 5:6].T, atol=1e-5)


def test_llm_int8_on_tiny_model(tiny):
    model = tiny
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    report = quant.llm_int8(model, threshold=1.0, calibration=ids)
    assert report.layers == 14
    assert len(quant.int8.int8_linears(model)) == 14
    assert set(report.outliers) == {
        f"layers.{i}.{n}" for i in range(2) for n in (name for group in walk.SEQUENTIAL_GROUPS for name in group)
    }
    assert any(v > 0 for v in report.outliers.values())  # threshold 1 on unit-scale activations: many
    assert (model(ids).logits - ref).abs().max() < 0.05
    linear_params = sum(m.weight_int8.numel() for m in quant.int8.int8_linears(model).values())
    assert report.params == linear_params


def test_int8_weight_bytes(tiny):
    model = tiny
    before = evaluate.weight_bytes(model)
    report = quant.w8a8(model)
    after = evaluate.weight_bytes(model)
    rows = sum(m.out_features for m in quant.int8.int8_linears(model).values())
    assert before - after == 4 * report.params - (report.params + 4 * rows)  # fp32 -> int8 + an fp32 scale per row


# --- SmoothQuant ---------------------------------------------------------------------------------


def test_smoothing_factors_migrate_the_range():
    act_max = torch.tensor([40.0, 1.0, 0.5, 8.0])
    w = torch.tensor([[0.1, -0.4, 0.2, 0.05], [-0.05, 0.1, -0.1, 0.02]])
    s = quant.smoothing_factors(act_max, [w], 0.5)
    w_max = torch.tensor([0.1, 0.4, 0.2, 0.05])
    assert torch.allclose(s, (act_max / w_max).sqrt())  # eq. 4 with alpha = 0.5
    assert torch.allclose(act_max / s, w_max * s)  # both ranges meet at sqrt(max|X| max|W|)
    assert torch.allclose(quant.smoothing_factors(act_max, [w], 1.0), act_max)
    assert torch.allclose(quant.smoothing_factors(act_max, [w, 3 * w], 0.0), 1 / (3 * w_max))  # max over all linears


def test_smoothing_preserves_the_model(tiny):
    model = tiny
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    report = quant.smooth(model, ids, alpha=0.5)
    assert len(report.scales) == 4  # 2 layers x (input_layernorm, post_attention_layernorm)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # something moved
    assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)  # exact up to float rounding


def test_smoothquant_w8a8_beats_naive_per_tensor_w8a8_on_outliers():
    lin = _linear(seed=3)
    x = _activations(size=60.0, seed=4)  # one feature 60x the others, in every token
    ref = lin(x)
    # naive W8A8: one absmax scale for all of X and one for all of W
    xq, xs = absmax_quantize(x, dim=None)
    wq, ws = absmax_quantize(lin.weight.detach(), dim=None)
    naive = int8_matmul(xq, wq).float() * xs * ws
    # SmoothQuant: smooth with s from max|X_j|, then per-channel W and per-token A
    s = quant.smoothing_factors(x.abs().amax(0), [lin.weight], 0.5)
    smoothed = copy.deepcopy(lin)
    smoothed.weight.data *= s[None, :]
    sq = Int8Linear.from_linear(smoothed, "per-token")(x / s)
    plain = Int8Linear.from_linear(lin, "per-token")(x)
    err = lambda y: ((y - ref).norm() / ref.norm()).item()
    assert err(sq) < err(naive) / 3
    assert err(sq) < err(plain)  # smoothing helps per-token W8A8 too
    assert err(sq) < 0.01


def test_smoothquant_and_w8a16_on_tiny_model(tiny):
    model = tiny
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    m16 = copy.deepcopy(model)
    quant.w8a16(m16)
    report = quant.smoothquant(model, ids, alpha=0.5)
    assert report.method == "SmoothQuant W8A8" and report.layers == 14
    assert report.smoothing is not None and report.matmul.startswith(("torch._int_mm", "exact"))
    for m in (model, m16):
        assert (m(ids).logits - ref).abs().max() < 0.05


# --- NF4 ---------------------------------------------------------------------------------------


def test_dynamic_map():
    m = dynamic_map()
    assert m.numel() == 256 and (m[1:] > m[:-1]).all()
    assert m.max() == 1.0 and 0.0 in m.tolist() and m.min() > -1.0


def test_nf4_round_trip_exact_on_the_grid():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 128), generator=g)
    codes[:, ::64] = 15  # each block of 64 holds the level 1.0, so its absmax is exactly its scale
    absmax = torch.rand(8 * 128 // 64, generator=g) + 0.5  # [n_blocks]
    w = (quant.NF4[codes].reshape(-1, 64) * absmax[:, None]).reshape(8, 128)
    lin = nn.Linear(128, 8, bias=False)
    lin.weight.data = w
    q = NF4Linear.from_linear(lin, blocksize=64, double_quant=False)
    assert torch.equal(q.dequantized_weight(), w)  # values on the grid come back exactly
    assert torch.equal(q.dequantized_weight_reference(), w)  # the plain unpack + lookup path agrees
    odd = nn.Linear(5, 3, bias=False)  # 15 weights: an odd count, blocks of 5
    dq = NF4Linear.from_linear(odd, 5, double_quant=True)
    assert torch.equal(dq.dequantized_weight(), dq.dequantized_weight_reference())
    x = torch.randn(3, 128, generator=g)
    assert torch.allclose(q(x), x @ w.T, atol=1e-5)
    # bytes: 4-bit codes + one fp32 absmax per 64 weights = 4.5 bits per weight
    assert q.stored_bytes() == 8 * 128 // 2 + 4 * 16
    assert 8 * q.stored_bytes() / w.numel() == 4.5


def test_double_quant_round_trip_and_bytes():
    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(1000, generator=g) * 0.2 + 0.05  # 1000 constants: 3 full blocks of 256 + 232
    codes, scale, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,) and scale.shape == (4,) and offset.shape == (1,)
    back = double_dequantize(codes, scale, offset)
    centred_max = (absmax - absmax.mean()).abs().max()
    # the dynamic map's steps near 1 are ~1.4% of the block absmax: error below 1% of the centred range
    assert (back - absmax).abs().max() < 0.01 * centred_max
    lin = _linear(256, 256)
    dq = NF4Linear.from_linear(lin, 64, double_quant=True)
    n_blocks = 256 * 256 // 64  # 1024 constants -> 4 second-level blocks
    assert dq.stored_bytes() == 256 * 256 // 2 + n_blocks + 4 * 4 + 4
    bits = 8 * dq.stored_bytes() / (256 * 256)
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3  # 4.127 bits per weight (QLoRA sec. 3)
    plain = NF4Linear.from_linear(lin, 64, double_quant=False)
    assert torch.allclose(dq.dequantized_weight(), plain.dequantized_weight(), rtol=0.02, atol=1e-4)


def test_nf4_on_tiny_model(tiny):
    model = tiny
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    before = evaluate.weight_bytes(model)
    report = quant.nf4(model, blocksize=64, double_quant=True)
    assert report.layers == 14 and len(report.errors) == 14
    assert all(e < 0.02 for e in report.errors.values())  # NF4 on Gaussian-like weights: ~1% relative error
    saved = before - evaluate.weight_bytes(model)
    assert saved > 0.85 * 4 * report.params  # most of the fp32 linear bytes are gone
    assert (model(ids).logits - ref).abs().max() < 0.5


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), float("inf"), "6"])
def test_llm_int8_rejects_bad_threshold(tiny, threshold):
    model = tiny
    with pytest.raises(ValueError, match="threshold"):
        quant.llm_int8(model, threshold=threshold)
    assert not quant.int8.int8_linears(model)  # nothing changed


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), None])
def test_smoothquant_rejects_bad_alpha(tiny, alpha):
    model = tiny
    ids = torch.randint(0, 256, (1, 16))
    with pytest.raises(ValueError, match="alpha"):
        quant.smoothquant(model, ids, alpha=alpha)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quant.smoothing_factors(torch.ones(4), [torch.ones(2, 4)], alpha)


def test_nf4_rejects_bad_blocksize(tiny):
    model = tiny
    for bad in (7, 0, -64, 64.0):
        with pytest.raises(ValueError, match="blocksize"):
            quant.nf4(model, blocksize=bad)
    assert not quant.nf4_linears(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)  # checked before anything changed


def test_smoothing_rejects_non_finite_calibration(tiny):
    model = tiny
    model.model.embed_tokens.weight.data[7, 3] = math.nan  # token 7's activations are NaN
    ids = torch.full((1, 16), 7)
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.smooth(model, ids, alpha=0.5)
    with pytest.raises(ValueError, match="non-finite"):
        quant.smoothing_factors(torch.tensor([1.0, math.inf]), [torch.ones(2, 2)], 0.5)


def test_non_finite_weights_are_rejected():
    lin = _linear()
    lin.weight.data[0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        Int8Linear.from_linear(lin)
    with pytest.raises(ValueError, match="non-finite"):
        NF4Linear.from_linear(lin, 32)
