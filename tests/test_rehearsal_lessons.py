"""Each compression lesson's declared runtime (labkit.runtime.LESSONS) is the smallest its rehearsed GPU profile
fits (labkit.rehearsal.compression: LLaMA-7B shapes, fake tensors, no GPU)."""

import pytest

from labkit import runtime
from labkit.rehearsal import fits, rehearse
from labkit.rehearsal.compression import PLANS

ORDER = ["T4", "L4", "A100-40", "A100-80"]  # runtimes from the smallest


@pytest.fixture(scope="module")
def reports():
    return {}


def report_for(reports, lesson):
    if lesson not in reports:
        reports[lesson] = rehearse(PLANS[lesson], f"lesson {lesson}")
    return reports[lesson]


@pytest.mark.parametrize("lesson", sorted(PLANS))
def test_declared_runtime_is_the_smallest_that_fits(reports, lesson):
    report = report_for(reports, lesson)
    need = runtime.need(lesson)
    assert need.basis == "rehearsed", f"lesson {lesson}: LESSONS says {need.basis!r}, but a plan rehearses it"
    fit = fits(report, need.runtime)
    assert fit.ok, f"lesson {lesson} on {need.runtime}: {fit.why}\n{report.summary()}"
    index = ORDER.index(need.runtime)
    if index > 0:
        smaller = ORDER[index - 1]
        assert not fits(report, smaller).ok, f"lesson {lesson} fits {smaller}: declare it\n{report.summary()}"


def test_every_plan_walks_two_layers_and_says_so(reports):
    report = report_for(reports, "04")
    assert any("2 of 32 layers" in n for n in report.notes)
    assert report.phases["cell 2: load"][0] >= 12.5 * 2**30  # LLaMA-7B's fp16 weights on the stand-in GPU
