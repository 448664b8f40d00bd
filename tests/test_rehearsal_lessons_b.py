"""Lessons 07, 09, 10, 11 and 12 rehearsed at LLaMA-7B's shapes (labkit.rehearsal.serving_and_training):
each lesson's GPU profile, as its code runs today, fits the runtime runtime.LESSONS declares for it and
not the next smaller one. Lessons 07 and 12 fit no runtime today: strict xfails, which fail (and ask for a
smaller declaration) once a memory plan makes them fit."""

from __future__ import annotations

import functools

import pytest

from labkit import runtime
from labkit.rehearsal import RUNTIMES, fits, rehearse
from labkit.rehearsal.serving_and_training import PLANS

GiB = 2**30
ORDER = list(RUNTIMES)  # smallest first: T4, L4, A100-40, A100-80
OVER_EVERY_RUNTIME = {"07", "12"}  # a 7B teacher next to a student trained with AdamW on fp32 master copies


@functools.cache
def report(key: str):
    return rehearse(PLANS[key], f"lesson{key}")


def test_the_plans_are_the_lessons_declared_as_rehearsed():
    for key in PLANS:
        assert runtime.LESSONS[key].basis == "rehearsed", key


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason="fits no runtime today"))
        if k in OVER_EVERY_RUNTIME
        else k
        for k in PLANS
    ],
)
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


@pytest.mark.parametrize("key", sorted(OVER_EVERY_RUNTIME))
def test_lessons_over_every_runtime_say_so(key):
    """The training lessons exceed even an 80 GB A100 today; their declaration is the largest runtime and
    its line names the rehearsed peak."""
    r = report(key)
    fit = fits(r, "A100-80")
    assert not fit.ok and "GPU peak" in fit.why
    need = runtime.LESSONS[key]
    assert need.runtime == "A100-80" and f"{r.peak_gpu / GiB:.1f} GiB" in need.why


def test_lesson07_counts_adamw_state_and_fp32_master_copies():
    """Distillation: teacher (12.55 GiB) + student0 and student_kd (16 of 32 layers, ~6.5 GiB each) + for the
    trainable 3.37e9 parameters (16 layers and the untied lm_head; the embedding is frozen) fp32 master
    copies, their fp32 gradients and AdamW's two fp32 states: 16 bytes per parameter (50 GiB)."""
    r = report("07")
    teacher = 6_738_415_616 * 2
    layer = 202_383_360
    student = (16 * layer + 2 * 32000 * 4096 + 4096) * 2
    trainable = 16 * layer + 32000 * 4096 + 4096
    low = teacher + 2 * student + 16 * trainable
    assert low < r.phases["distill"][0] < low + 12 * GiB
    assert r.phases["distill"][0] == r.peak_gpu


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
