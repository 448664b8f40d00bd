"""labkit.quant.cpu_kernels: torch's int8 / int4 weight-only CPU matmuls on labkit's layouts.

The kernels take bf16 activations and bf16 scales (the fast path; see the module docstring), so the layers
are compared with the same layers computed in torch from the weights they hold (dequantized_weight, exact
up to the bf16 rounding of the input), and with the original quantized layers within the bf16 tolerance."""

import copy

import pytest
import torch
from torch import nn

from labkit import evaluate, quant
from labkit.quant import cpu_kernels
from labkit.quant.int8 import Int8Linear
from labkit.quant.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not cpu_kernels.cpu_kernels_available(), reason="this torch lacks the CPU kernels")

BF16 = 2**-8  # relative rounding of a bf16 value (8 significant bits)


def _linear(out_f=96, in_f=128, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g))
    return layer


def _x(in_f=128, rows=3, seed=1):
    return torch.randn(2, rows, in_f, generator=torch.Generator().manual_seed(seed))  # [batch, tokens, in]


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("float_offset", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layer_computes_with_the_weights_of_the_quantlinear(float_offset, group_size):
    ql = QuantLinear.from_linear(_linear(bias=True), bits=4, group_size=group_size, float_offset=float_offset)
    layer = cpu_kernels.Int4CPULinear.from_quant_linear(ql)
    w = layer.dequantized_weight()  # the kernel's weights: QuantLinear's, with bf16 scales and offsets
    w_ref = ql.dequantized_weight(torch.float32)
    scale_range = ql.scales.float().abs().max().item() * 15
    assert (w - w_ref).abs().max() <= 2 * BF16 * scale_range  # only the scales' bf16 rounding moved them
    x = _x()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, 3, 96)
    expected = x.bfloat16().float() @ w.T + ql.bias  # the same weights, the input rounded as the kernel does
    assert _rel_err(y, expected) < 4 * BF16
    assert _rel_err(y, ql(x)) < 8 * BF16  # and the original layer, within the bf16 roundings
    assert layer.stored_bytes() < ql.stored_bytes() * 1.6  # packed codes: about half a byte per weight


def test_int8_layer_reads_the_w8a16_layout():
    source = Int8Linear.from_linear(_linear(bias=True), act="float")
    layer = cpu_kernels.Int8CPULinear.from_int8_linear(source)
    assert torch.equal(layer.weight_int8, source.weight_int8)  # the same codes, no conversion
    x = _x()
    expected = x.bfloat16().float() @ layer.dequantized_weight().T + source.bias
    assert _rel_err(layer(x), expected) < 4 * BF16
    assert _rel_err(layer(x), source(x)) < 8 * BF16
    with pytest.raises(ValueError, match="weight-only"):
        cpu_kernels.Int8CPULinear.from_int8_linear(Int8Linear.from_linear(_linear(), act="per-token"))


def test_refused_layers_name_what_they_lack():
    with pytest.raises(ValueError, match="bits=3"):
        cpu_kernels.check_int4(QuantLinear.from_linear(_linear(), bits=3, group_size=32), "q")
    with pytest.raises(ValueError, match="group_size=16"):
        cpu_kernels.check_int4(QuantLinear.from_linear(_linear(), bits=4, group_size=16), "q")
    with pytest.raises(ValueError, match="group_size=None"):
        cpu_kernels.check_int4(QuantLinear.from_linear(_linear(), bits=4, group_size=None), "q")
    with pytest.raises(ValueError, match="expected a labkit QuantLinear"):
        cpu_kernels.check_int4(_linear(), "q")


def test_a_rtn_model_runs_on_the_kernels(tiny, calibration):
    quant.rtn(tiny, 4, 32, float_offset=True)
    reference = copy.deepcopy(tiny)
    report = cpu_kernels.to_cpu_kernels(tiny)
    assert report.int4_layers == 14 and report.int8_layers == 0 and report.lm_head
    assert report.weight_bytes_after < report.weight_bytes_before
    assert isinstance(tiny.lm_head, cpu_kernels.Int8CPULinear) and not tiny.config.tie_word_embeddings
    assert tiny.model.embed_tokens.weight.dtype == torch.float32  # the lookup keeps its float copy
    with torch.no_grad():
        got, want = tiny(calibration).logits, reference(calibration).logits
    assert _rel_err(got, want) < 0.05  # bf16 activations in every linear, int8 output layer
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert evaluate.weight_bytes(tiny) > 0


def test_a_w8a16_model_runs_on_the_kernels(tiny, calibration):
    quant.w8a16(tiny)
    reference = copy.deepcopy(tiny)
    report = cpu_kernels.to_cpu_kernels(tiny, lm_head=False)
    assert report.int8_layers == 14 and not report.lm_head
    assert isinstance(tiny.lm_head, nn.Linear)
    with torch.no_grad():
        assert _rel_err(tiny(calibration).logits, reference(calibration).logits) < 0.05


def test_a_failed_conversion_leaves_the_model_unchanged(tiny):
    quant.rtn(tiny, 4, 32)
    layer = tiny.model.layers[1].mlp.down_proj
    tiny.model.layers[1].mlp.down_proj = QuantLinear.from_linear(layer.to_float(), bits=4, group_size=16)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    modules = [type(m) for m in tiny.modules()]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: the int4 CPU kernel takes group_size"):
        cpu_kernels.to_cpu_kernels(tiny)
    assert [type(m) for m in tiny.modules()] == modules and tiny.config.tie_word_embeddings
    after = tiny.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nothing_to_convert_is_said(tiny):
    with pytest.raises(ValueError, match="nothing to convert"):
        cpu_kernels.to_cpu_kernels(tiny, lm_head=False)


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu_decode.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_decode_benchmark_runs_in_smoke_mode(tmp_path, capsys):
    """benchmarks/bench_cpu_decode.py measures on a quiet machine; --smoke runs every row on the tiny model."""
    bench = _bench()
    assert bench.main(["--smoke", "--json", str(tmp_path / "rows.json")]) == 0
    import json

    rows = {r["row"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert set(rows) == set(bench.ROWS) - {"llama.cpp"} or set(rows) == set(bench.ROWS)
    assert rows["w4-rtn-kernel"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert all(r["agreement"].endswith("/8") for r in rows.values() if "agreement" in r)


def test_the_decode_targets_are_checked():
    bench = _bench()
    row = lambda name, tps: dict(row=name, tokens_per_s=tps)
    assert bench.check_targets([row("fp32", 10), row("w8a16-kernel", 16), row("w4-rtn-kernel", 12)]) == []
    missed = bench.check_targets([row("fp32", 10), row("bf16", 30), row("w8a16-kernel", 14), row("w4-rtn-torch", 9)])
    assert len(missed) == 2 and "1.5x" in missed[0] and "4-bit" in missed[1]
