"""labkit.lora.adapters: train a model or one block through LoRA adapters, merged back at the end of the block
(how the GPU profile trains the students of lessons 07 and 12), and models.meta_copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from labkit import distill, evaluate, lora, models, profiles, quant

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rank_none_changes_nothing(tiny, calibration):
    flags = [p.requires_grad for p in tiny.parameters()]
    with lora.adapters(tiny, None) as wrapped:
        assert wrapped == {}
        assert [p.requires_grad for p in tiny.parameters()] == flags
        assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())
    assert profiles.PROFILES["cpu"].lora_rank is None  # the CPU profile trains every weight


def test_inside_only_the_adapters_train(tiny):
    tiny.model.embed_tokens.weight.requires_grad_(False)  # as lesson 07 does
    flags = [p.requires_grad for p in tiny.parameters()]
    with lora.adapters(tiny, 4) as wrapped:
        assert len(wrapped) == 7 * len(tiny.model.layers)  # q, k, v, o, gate, up, down in each layer
        assert all(name.startswith("model.layers.") for name in wrapped)
        trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
        assert trainable == {f"{name}.{ab}" for name in wrapped for ab in ("A", "B")}
        assert all(isinstance(tiny.get_submodule(name), lora.LoRALinear) for name in wrapped)
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())
    assert [p.requires_grad for p in tiny.parameters()] == flags


def test_the_merged_model_computes_what_the_adapters_did(tiny, calibration):
    before = logits(tiny, calibration)
    with lora.adapters(tiny, 4, alpha=8.0) as wrapped:
        torch.testing.assert_close(logits(tiny, calibration), before)  # B = 0: the model as it was
        with torch.no_grad():
            for adapter in wrapped.values():
                adapter.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        inside = logits(tiny, calibration)
    assert not torch.allclose(inside, before, atol=1e-3)
    torch.testing.assert_close(logits(tiny, calibration), inside, rtol=1e-4, atol=1e-4)  # W + alpha/r · B A


def test_training_through_adapters_moves_only_the_decoder_linears(tiny, calibration):
    start = copy.deepcopy(tiny)
    with lora.adapters(tiny, 4):
        curve = distill.finetune(tiny, calibration, 4, lr=1e-2, batch_size=2, progress=False)
    assert curve[-1] < curve[0]
    linears = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in models.linear_layers(tiny.model.layers[i])}
    for (name, p), q in zip(tiny.named_parameters(), start.parameters()):
        assert torch.equal(p, q) != (name in linears), name  # every decoder linear moved; nothing else did


def test_adapters_on_one_decoder_layer(tiny):
    layer = tiny.model.layers[1]
    names = sorted(models.linear_layers(layer))
    with lora.adapters(layer, 2) as wrapped:
        assert sorted(wrapped) == names  # names inside the layer
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {f"{n}.{ab}" for n in names for ab in "AB"}
        assert all(p.requires_grad for p in tiny.model.layers[0].parameters())  # outside the block: untouched
        assert not isinstance(tiny.model.layers[0].mlp.up_proj, lora.LoRALinear)
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())


def test_an_error_in_the_block_still_merges_and_restores(tiny, calibration):
    flags = [p.requires_grad for p in tiny.parameters()]
    with pytest.raises(RuntimeError, match="stop"), lora.adapters(tiny, 2):
        raise RuntimeError("stop")
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())
    assert [p.requires_grad for p in tiny.parameters()] == flags


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank=0: need a positive integer"),
        ({"rank": True}, r"rank=True: need a positive integer"),
        ({"rank": 4, "alpha": 0.0}, r"alpha=0.0: need a finite number > 0"),
        ({"rank": 4, "alpha": float("nan")}, r"alpha=nan: need a finite number > 0"),
    ],
)
def test_bad_settings_are_refused_before_any_change(tiny, kwargs, match):
    names = [n for n, _ in tiny.named_modules()]
    with pytest.raises(ValueError, match=match), lora.adapters(tiny, **kwargs):
        pass
    assert [n for n, _ in tiny.named_modules()] == names


def test_bad_modules_are_refused(tiny):
    with pytest.raises(ValueError, match=r"wrap a single linear"), lora.adapters(nn.Linear(4, 4), 2):
        pass
    with pytest.raises(ValueError, match=r"holds no linear layer"), lora.adapters(tiny.model.norm, 2):
        pass
    with (
        lora.adapters(tiny, 2),
        pytest.raises(ValueError, match="already holds LoRA adapters"),
        lora.adapters(tiny.model.layers[0], 2),
    ):
        pass


# --- models.meta_copy ---------------------------------------------------------------------------------


def test_meta_copy_has_the_structure_and_no_memory(tiny):
    copy16 = models.meta_copy(tiny).to(torch.float16)
    assert all(p.is_meta for p in copy16.parameters())
    assert copy16.lm_head.weight is copy16.model.embed_tokens.weight  # the tie survives
    assert evaluate.weight_bytes(copy16) == evaluate.weight_bytes(copy.deepcopy(tiny).half())
    assert models.parameter_count(copy16) == models.parameter_count(tiny)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tiny.parameters())  # unchanged


# --- QLoRA: adapters over frozen quantized linears, kept beside them ----------------------------------------


def _codes(model):  # each quantized linear's packed codes, by its slot's name
    return {
        n.removesuffix(".base"): m.qweight.clone()
        for n, m in model.named_modules()
        if isinstance(m, (quant.QuantLinear, quant.NF4Linear))
    }


def test_quantized_linears_refuse_a_merge_and_nothing_changes(tiny, calibration):
    quant.rtn(tiny, 4, 16)
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match="merge=False"):
        lora.lora_recover(tiny, calibration, steps=2, rank=4)
    with pytest.raises(ValueError, match="merge=False"), lora.adapters(tiny, 4):
        pass
    after = tiny.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())


@pytest.mark.parametrize("quantize", ["rtn", "nf4"])
def test_qlora_trains_adapters_over_frozen_codes(tiny, calibration, quantize):
    if quantize == "rtn":
        quant.rtn(tiny, 4, 16)
        base_type = quant.QuantLinear
    else:
        quant.nf4(tiny, blocksize=64)
        base_type = quant.NF4Linear
    codes, size = _codes(tiny), evaluate.weight_bytes(tiny)
    before = logits(tiny, calibration)
    report = lora.lora_recover(tiny, calibration, steps=4, rank=4, lr=1e-2, batch_size=2, merge=False)
    slots = {n: m for n, m in tiny.named_modules() if isinstance(m, lora.LoRALinear)}
    assert len(slots) == 14 and all(isinstance(m.base, base_type) for m in slots.values())
    assert report["trainable"] == sum(4 * (m.in_features + m.out_features) for m in slots.values())
    assert report["merged"] is False and report["loss"][-1] < report["loss"][0]
    assert not any(p.requires_grad for m in slots.values() for p in (m.A, m.B))  # trained, now frozen
    after = _codes(tiny)
    assert len(after) == 14 and all(torch.equal(after[n], codes[n]) for n in codes)  # the bases are untouched
    assert evaluate.weight_bytes(tiny) == size + 4 * report["trainable"]  # fp32 adapters on top of the codes
    assert not torch.allclose(logits(tiny, calibration), before, atol=1e-4)


def test_an_error_inside_a_kept_block_removes_the_adapters(tiny, calibration):
    quant.rtn(tiny, 4, 16)
    before = logits(tiny, calibration)
    with pytest.raises(RuntimeError, match="stop"), lora.adapters(tiny, 4, merge=False):
        raise RuntimeError("stop")
    assert not any(isinstance(m, lora.LoRALinear) for m in tiny.modules())
    torch.testing.assert_close(logits(tiny, calibration), before, rtol=0, atol=0)
