"""Lessons 07, 09, 10, 11 and 12 rehearsed at LLaMA-7B's shapes (labkit.rehearsal.serving_and_training):
each lesson's GPU profile, as its code runs today, fits the runtime runtime.LESSONS declares for it and
not the next smaller one. Lessons 07 and 12 fit because their students train LoRA adapters on the GPU
profile (profiles.Profile.lora_rank) and lesson 12 keeps one compressed 7B model alive at a time."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from labkit import runtime
from labkit.rehearsal import GPU, RUNTIMES, fits, rehearse
from labkit.rehearsal.serving_and_training import PLANS, _deepcopy

GiB = 2**30
ORDER = list(RUNTIMES)  # smallest first: T4, L4, A100-40, A100-80
MODEL_BYTES = 6_738_415_616 * 2  # LLaMA-7B in fp16


@functools.cache
def report(key: str):
    return rehearse(PLANS[key], f"lesson{key}")


def test_the_plans_are_the_lessons_declared_as_rehearsed():
    for key in PLANS:
        assert runtime.LESSONS[key].basis == "rehearsed", key


@pytest.mark.parametrize("key", sorted(PLANS))
def test_a_lesson_fits_its_declared_runtime_and_not_the_one_below(key):
    r = report(key)
    declared = runtime.LESSONS[key].runtime
    fit = fits(r, declared)
    assert fit.ok, f"lesson {key} on {declared}: {fit.why}"
    below = ORDER[: ORDER.index(declared)]
    if below:
        assert not fits(r, below[-1]).ok, f"lesson {key} fits {below[-1]}: declare that one"
    else:
        assert declared == "T4"  # the smallest runtime: nothing smaller to refuse


def test_lesson07_trains_adapters_not_every_weight():
    """Distillation: teacher (12.55 GiB) + student0 and student_kd (16 of 32 layers, ~6.5 GiB each) + the training's
    activations and the LoRA adapters' state. AdamW on every weight of the student (3.37e9 trainable parameters,
    16 bytes each: fp32 master, gradient, two moments) would add 50 GiB; the adapters add ~0.16 GiB."""
    r = report("07")
    layer = 202_383_360
    student = (16 * layer + 2 * 32000 * 4096 + 4096) * 2
    models_alive = MODEL_BYTES + 2 * student
    assert models_alive < r.phases["distill"][0] < models_alive + 6 * GiB
    trainable = 16 * layer + 32000 * 4096 + 4096
    assert r.peak_gpu + 16 * trainable > RUNTIMES["A100-80"].gpu_bytes  # full training would not fit even there


def test_lesson12_holds_one_compressed_model_at_a_time():
    """Cell 15 compresses `model` itself, the naive GPTQ tried inside transform.undone: one model and a walk on
    the GPU, the replaced weights in CPU memory. After cell 20's distillation the teacher is freed: the packed
    model and the pruned student are less than one dense model's bytes together."""
    r = report("12")
    gpu, host = r.phases["cell 15: SparseGPT 2:4 in place, naive GPTQ inside transform.undone"]
    assert gpu < MODEL_BYTES + 6 * GiB
    assert host > 2 * 2 * 4096 * (4 * 4096 + 3 * 11008)  # 2 layers' fp16 linears parked (2 of 32 walked)
    assert r.phases["cell 20: perplexity, generation"][0] < MODEL_BYTES + 2 * GiB
    assert r.phases["cell 24: the exports reloaded, one at a time"][0] < 2 * MODEL_BYTES + 2 * GiB


def test_rehearsal_deepcopy_counts_a_trained_weight_once():
    """A deep-copied fake tensor's views get storages of their own (FakeTensorMode), so a copy.deepcopy'd linear
    that saves its transposed weight for the backward pass would count the weight twice; the plans' _deepcopy
    (new empty tensors) has views that share their storage and counts it once, as CUDA would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        linear = torch.nn.Linear(8, 4, bias=False)
        quirk = copy.deepcopy(linear).weight
        fixed = _deepcopy(linear).weight
        assert quirk.t().untyped_storage() is not quirk.untyped_storage()  # the quirk _deepcopy works around
        assert fixed.t().untyped_storage() is fixed.untyped_storage()
        assert (fixed.shape, fixed.dtype, fixed.requires_grad) == (linear.weight.shape, torch.float32, True)

    def plan(r):
        linear = torch.nn.Linear(2048, 2048, bias=False, device=GPU, dtype=torch.float16).requires_grad_(False)
        twin = _deepcopy(linear)
        del linear
        x = torch.zeros(8, 2048, device=GPU, dtype=torch.float16, requires_grad=True)
        with r.phase("backward"), torch.enable_grad():
            twin(x).sum().backward()

    weight_bytes = 2048 * 2048 * 2
    assert weight_bytes < rehearse(plan).phases["backward"][0] < 1.1 * weight_bytes


def test_lesson11_loads_no_llama_7b():
    r = report("11")
    assert r.peak_gpu < 1 * GiB and r.peak_host < 2 * GiB


def test_lesson12_flap_stand_in_keeps_about_80_percent_of_the_decoder():
    import torch
    from transformers import LlamaForCausalLM

    from labkit.rehearsal import llama_7b_config
    from labkit.rehearsal.serving_and_training import flap20_stand_in_config

    def decoder_params(config):
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(config).model.layers.parameters())

    ratio = decoder_params(flap20_stand_in_config()) / decoder_params(llama_7b_config())
    assert 0.78 <= ratio <= 0.82


def test_lesson10_fuse_parks_the_replaced_fp16_weights_on_the_host():
    """fuse(w4a16=True) is all-or-nothing: on an accelerator the replaced fp16 linears are copied to CPU memory
    (32 layers x 202,375,168 weights x 2 bytes = 12.06 GiB) and freed on the GPU, which then holds the model
    plus one layer's packing at most."""
    r = report("10")
    linears = 32 * 202_375_168 * 2
    assert linears <= r.phases["fuse"][1] <= linears * 1.001
    assert r.peak_gpu < 6_738_415_616 * 2 + 1 * GiB
