"""labkit.quant.ct_export: a QuantLinear model as a compressed-tensors pack-quantized checkpoint, loaded back
by transformers' integration (symmetric grids) or decompressed by compressed-tensors itself (asymmetric)."""

import json

import pytest
import torch

from labkit import models, quant
from labkit.quant import ct_export

pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the test extra")


def _quantized(sym: bool, group_size, bits: int = 4):
    model = models.load("tiny-llama-random")[0]
    quant.rtn(model, bits, group_size, sym=sym)
    return model


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("group_size", [32, None])
def test_transformers_loads_a_symmetric_export_with_labkits_logits(tmp_path, group_size):
    from transformers import AutoModelForCausalLM

    model = _quantized(True, group_size)
    folder = quant.save_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (4, True, group_size)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)  # the same weights, the same arithmetic


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (8, None)])
def test_compressed_tensors_decompresses_an_asymmetric_export(bits, group_size):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = _quantized(False, group_size, bits)
    scheme = QuantizationScheme.model_validate(
        ct_export.quantization_config(bits, group_size, False)["config_groups"]["group_0"]
    )
    for name, layer in quant.quant_linears(model).items():
        stored = ct_export.compressed_tensors(layer, torch.float32)
        assert stored["weight_packed"].dtype == torch.int32 and "weight_zero_point" in stored
        weight = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
        assert torch.equal(weight.float(), layer.dequantized_weight(torch.float32)), name


def test_refusals_leave_nothing_written(tmp_path):
    float_offset = models.load("tiny-llama-random")[0]
    quant.rtn(float_offset, 4, 32, float_offset=True)
    with pytest.raises(ValueError, match="float offset"):
        quant.save_compressed_tensors(float_offset, tmp_path / "a")
    with pytest.raises(ValueError, match="no QuantLinear"):
        quant.save_compressed_tensors(models.load("tiny-llama-random")[0], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    model = _quantized(True, 32)
    quant.save_compressed_tensors(model, tmp_path / "c")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        quant.save_compressed_tensors(model, tmp_path / "c")


def test_a_gptq_export_loads_in_transformers_with_labkits_logits(tmp_path, calibration):
    """The issue's case: a GPTQ model (symmetric grid, groups, no act-order) through a standard library."""
    from transformers import AutoModelForCausalLM

    model = models.load("tiny-llama-random")[0]
    quant.gptq(model, calibration, bits=4, group_size=32, sym=True, act_order=False)
    folder = quant.save_compressed_tensors(model, tmp_path / "gptq-ct")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
