"""labkit.kernels.llama: a transformers Llama through the fused kernels (tiny-llama-random).

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before any launch); with
TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU in fp16.
Tolerances: fp32 1e-5 relative to the logits' magnitude (the same sums in another order); the fp16
GPU run 2e-2 (fp16 activations through two layers, tl.dot's own accumulation order).
"""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the fused path is untested")

from labkit import evaluate, models
from labkit.kernels import _triton
from labkit.kernels import llama as fused_llama

if _triton.interpreted():
    DEVICE, DTYPE, TOL = "cpu", torch.float32, 1e-5
elif torch.cuda.is_available():
    DEVICE, DTYPE, TOL = "cuda", torch.float16, 2e-2
else:
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA GPU", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_on_device():
    """A fresh tiny random Llama on the kernels' device and dtype (conftest's `tiny` is fp32 on CPU)."""
    return models.load("tiny-llama-random", device=DEVICE, dtype=DTYPE)[0]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_fused_layers_compute_the_same_model(tiny_on_device):
    model = tiny_on_device
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref = logits(model, ids)
    report = fused_llama.fuse(model, backend="triton")
    assert report == {"layers": 2, "linears": 0, "weights": 0}
    out = logits(model, ids)
    assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()


def test_w4a16_model_equals_the_fake_quantized_model(tiny_on_device):
    model = tiny_on_device
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fake = copy.deepcopy(model)  # the same 4-bit weights, dequantized into ordinary nn.Linears
    for layer in models.decoder_layers(fake):
        for linear in models.linear_layers(layer).values():
            linear.weight.data = fused_llama.W4A16Linear.from_linear(linear, 32).dequantized_weight(DTYPE)
    report = fused_llama.fuse(model, w4a16=True, group_size=32, backend="triton")
    assert report["linears"] == 14 and report["weights"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, fused_llama.W4A16Linear) and down.qweight.shape == (64, 80)
    assert evaluate.weight_bytes(model) < evaluate.weight_bytes(fake)
    ref, out = logits(fake, ids), logits(model, ids)
    assert (out - ref).abs().max().item() <= TOL * ref.abs().max().item()
    fused_llama.set_backend(model, "torch")
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, fused_llama.W4A16Linear))
    with torch.no_grad():
        a = fake.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b) or DEVICE == "cuda"  # fp16 near-ties may differ on a GPU


def test_float_offset_reproduces_a_q4_1_grid():
    """Weights that lie on a Q4_1 grid (groups of 32, float scale and minimum) come back exactly."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 64), generator=g).float()
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid, as a quantizer's output does
    scale = (0.01 + torch.rand(8, 2, generator=g)).half().float()
    minimum = (-torch.rand(8, 2, generator=g)).half().float()
    w = codes * scale.repeat_interleave(32, 1) + minimum.repeat_interleave(32, 1)  # GGUF's d·q + m
    linear = torch.nn.Linear(64, 8, bias=False)
    linear.weight.data = w
    packed = fused_llama.W4A16Linear.from_linear(linear, 32, float_offset=True, backend="torch")
    assert (packed.dequantized_weight() - w).abs().max().item() < 1e-6
    assert packed.stored_bytes() == 8 * 32 + 2 * (8 * 2 * 4)  # codes + fp32 scales and zeros


def test_w4a16_holds_the_weights_of_labkit_quants_4bit_layout():
    """W4A16Linear is a repacking of quant's QuantLinear: the same codes, the same weights, bit for bit."""
    from labkit.quant.qlinear import QuantLinear

    linear = torch.nn.Linear(64, 8)
    for float_offset in (False, True):
        quantized = QuantLinear.from_linear(linear, 4, 32, float_offset=float_offset)
        packed = fused_llama.W4A16Linear.from_quant_linear(quantized, backend="torch")
        assert torch.equal(packed.qweight.reshape(-1), quantized.qweight)  # the same nibbles in the same order
        if not float_offset:  # (code - zero) · scale in fp32 on both sides; the float offset is rewritten as a zero
            assert torch.equal(packed.dequantized_weight(), quantized.dequantized_weight())
        torch.testing.assert_close(packed.dequantized_weight(), quantized.dequantized_weight(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs a 4-bit QuantLinear without act-order"):
        fused_llama.W4A16Linear.from_quant_linear(QuantLinear.from_linear(linear, 3, 32))


def test_fuse_input_errors(tiny_on_device):
    model = tiny_on_device
    with pytest.raises(ValueError, match="group_size=48 must be even and divide"):
        fused_llama.fuse(model, w4a16=True, group_size=48)
    with pytest.raises(ValueError, match=r"layer index 5 is outside 0\.\.1"):
        fused_llama.fuse(model, layers=[5])
    with pytest.raises(ValueError, match="layer 0 is not fused"):
        fused_llama.set_backend(copy.deepcopy(model), "torch")
    with pytest.raises(TypeError, match="Llama-architecture"):
        fused_llama.fuse(torch.nn.Linear(2, 2))


def test_a_gptq_model_reaches_the_w4a16_kernel(tiny_on_device, calibration):
    """One 4-bit layout: fuse(w4a16=True) takes GPTQ's QuantLinears as they are (their codes, repacked)."""
    from labkit import quant

    model = tiny_on_device
    quant.gptq(model, calibration.to(DEVICE), bits=4, group_size=32, act_order=False)
    ids = calibration[:2].to(DEVICE)
    expected = logits(model, ids)
    weights = {n: m.dequantized_weight(torch.float32) for n, m in quant.quant_linears(model).items()}
    report = fused_llama.fuse(model, w4a16=True, group_size=128)  # group_size is for float linears only
    assert report["linears"] == len(weights) == 14
    kernels_ = {n: m for n, m in model.named_modules() if isinstance(m, fused_llama.W4A16Linear)}
    for name, w in weights.items():
        assert torch.allclose(kernels_[name].dequantized_weight(), w, rtol=0, atol=1e-3 * w.abs().max())
    fused_llama.set_backend(model, "triton" if DEVICE == "cpu" else "auto")
    assert (logits(model, ids) - expected).abs().max() < 50 * TOL * expected.abs().max()


def test_an_act_order_model_is_refused_unchanged(tiny_on_device, calibration):
    from labkit import quant

    model = tiny_on_device
    quant.gptq(model, calibration.to(DEVICE), bits=4, group_size=32, act_order=True)
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="with act-order; the W4A16 kernel takes 4-bit codes in column order"):
        fused_llama.fuse(model, w4a16=True)
    assert [type(m) for m in model.modules()] == modules
