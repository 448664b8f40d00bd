"""labkit.stream: the calibration walk with decoder layers read from safetensors shards, one at a time."""

import importlib

import pytest
import torch
from safetensors.torch import load_file

from labkit import models, stream, walk

gptq = importlib.import_module("labkit.quant.gptq")
CALIB = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))


def quantize(index, layer, stats):  # a GPTQ update, as the gptq driver makes it
    for name, h in stats.items():
        linear = layer.get_submodule(name)
        linear.weight.copy_(gptq.gptq_quantize_weight(linear.weight, h.H, 4, 32).weight)
    return {name: h.xtx.clone() for name, h in stats.items()}


def make_stats(name, linear):
    return walk.Hessian(linear.in_features, device=linear.weight.device)


def test_streamed_walk_equals_the_in_memory_walk(tmp_path):
    model, _ = models.load("tiny-llama-random")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")  # several shards and an index
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    expected = walk.calibration_walk(model, CALIB, make_stats, quantize, sequential=walk.SEQUENTIAL_GROUPS)

    skel = stream.skeleton(tmp_path / "ckpt")
    assert all(p.device.type == "meta" for p in skel.model.layers.parameters())
    layers = stream.ShardLayers(tmp_path / "ckpt", tmp_path / "out")
    got = walk.calibration_walk(skel, CALIB, make_stats, quantize, sequential=walk.SEQUENTIAL_GROUPS, layers=layers)

    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in g)
    written = {}
    for i in range(len(model.model.layers)):
        written.update(load_file(str(tmp_path / "out" / f"layer_{i:03d}.safetensors")))
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before  # the checkpoint is untouched
    assert all(p.device.type == "meta" for p in skel.model.layers.parameters())  # layers went back


def test_stream_refuses_to_write_over_the_checkpoint(tmp_path):
    model, _ = models.load("tiny-llama-random")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="out_folder is the checkpoint's folder"):
        stream.ShardLayers(tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"holds no model\.safetensors"):
        stream.ShardLayers(tmp_path / "nothing", tmp_path / "out")
