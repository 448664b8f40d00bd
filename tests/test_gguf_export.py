"""labkit.quant.gguf_export: 4-bit QuantLinears as GGUF Q4_1 blocks, read back by the gguf package and by
transformers' GGUF loader (the real CPU-profile model: its own GGUF file is the template)."""

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from labkit import models, quant
from labkit.quant import gguf_export
from labkit.quant.qlinear import QuantLinear


def _layer(group_size=64, float_offset=False, out_f=8, in_f=128):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g))
    return QuantLinear.from_linear(linear, bits=4, group_size=group_size, float_offset=float_offset)


def _fp16_reference(layer):
    """The layer's weights with d and m rounded to fp16, as Q4_1 stores them."""
    scale = layer.scales.float()
    zero = layer.zero_points()
    offset = zero if layer.float_offset else -scale * zero
    per = (layer.group_size or layer.in_features) // 32
    d = scale.half().float().repeat_interleave(per * 32, 1)
    m = offset.half().float().repeat_interleave(per * 32, 1)
    return layer.codes().float() * d + m


@pytest.mark.parametrize("group_size,float_offset", [(32, True), (64, False), (128, False), (None, False)])
def test_q4_1_blocks_read_back_by_the_gguf_package(group_size, float_offset):
    layer = _layer(group_size, float_offset)
    blocks = gguf_export.q4_1_blocks(layer)
    assert blocks.shape == (8, 128 // 32 * 20) and blocks.dtype == np.uint8
    back = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q4_1).astype(np.float32))
    assert torch.equal(back, _fp16_reference(layer))  # the codes as they are, d and m in fp16
    assert (back - layer.dequantized_weight(torch.float32)).abs().max() < 2e-3 * layer.scales.abs().max() * 16


def test_the_llama_cpp_permutation_is_undone():
    rows = torch.arange(9 * 64 * 2).reshape(9 * 64, 2)
    permuted = gguf_export.llama_cpp_permute(rows, 9)
    assert not torch.equal(permuted, rows) and torch.equal(gguf_export._unpermute(permuted, 9), rows)
    assert permuted[1, 0] == rows[32, 0]  # head 0: row 1 is transformers' row d/2 (the rotary pair of row 0)


def test_layers_that_do_not_fit_q4_1_are_refused():
    with pytest.raises(ValueError, match="bits=3"):
        gguf_export.check_q4_1(QuantLinear.from_linear(nn.Linear(64, 4), bits=3, group_size=32), "q")
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_export.check_q4_1(QuantLinear.from_linear(nn.Linear(64, 4), bits=4, group_size=16), "q")
    with pytest.raises(ValueError, match="4-bit QuantLinears"):
        gguf_export.check_q4_1(nn.Linear(64, 4), "q")
    with pytest.raises(ValueError, match="template='tiny-llama-random'"):
        gguf_export.template_path("tiny-llama-random")


def test_a_4_bit_smollm2_exports_and_transformers_reads_it(real_model, tmp_path):
    model = copy.deepcopy(real_model[0])
    quant.rtn(model, 4, 64)  # integer zero points, groups of two Q4_1 blocks: not the file's own grid
    path = quant.save_gguf(model, tmp_path / "smollm2-rtn4-g64.gguf")
    stored = gguf_export.load_gguf_weights(path, model)
    for name, layer in quant.quant_linears(model).items():
        assert torch.equal(stored[f"{name}.weight"], _fp16_reference(layer)), name
    loaded = gguf_export.load_with_transformers(path)
    ids = torch.tensor([[504, 3458, 282, 260, 2463, 314, 216, 33, 34]])
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()  # d and m rounded to fp16, nothing else
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        quant.save_gguf(model, path)
    with pytest.raises(ValueError, match="template file itself"):
        quant.save_gguf(model, gguf_export.template_path(), overwrite=True)


def test_the_files_own_grid_exports_back_to_its_codes(real_model, tmp_path):
    model = copy.deepcopy(real_model[0])
    quant.rtn(model, 4, 32, float_offset=True)  # Q4_1's grid: the codes of the file (lesson 10)
    path = quant.save_gguf(model, tmp_path / "same.gguf")
    original = gguf_export.template_path().read_bytes()
    exported = path.read_bytes()
    assert len(exported) == len(original)
    same = np.frombuffer(exported, np.uint8) == np.frombuffer(original, np.uint8)
    assert same.mean() > 0.95  # codes, metadata, embedding, norms identical; some d / m differ in the last bit


def test_a_model_with_a_changed_norm_is_refused(real_model, tmp_path):
    model = models.load("smollm2-135m")[0]
    quant.rtn(model, 4, 32, float_offset=True)
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.input_layernorm\.weight differs from the template"):
        quant.save_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
