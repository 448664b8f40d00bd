"""benchmarks/gpu_check.sh's pieces that run without a GPU: the JSON summary and the bandwidth targets
(bench_kernels.check_targets), fed made-up step results and measurements."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summary_mod = _module("gpu_summary")


@pytest.fixture(scope="module")
def bench():
    return _module("bench_kernels")


def row(kernel, impl, ms=1.0, pct=None):
    return dict(kernel=kernel, impl=impl, ms=ms, gbps=0.0 if pct is None else 48 * pct, pct_peak=pct)


def good_rows(layers=4):
    return [
        row("rms_norm + residual [4096x4096]", "torch eager", 0.2, 30.0),
        row("rms_norm + residual [4096x4096]", "triton", 0.05, 80.0),
        row("silu_and_mul [4096x22016]", "triton", 0.1, 75.0),
        row("rotary [8x32x512x128]", "triton", 0.02, 60.0),
        row("paged attn b32 ctx1024 h32/32 d128", "triton", 0.2, 70.0),
        row("paged attn b32 ctx1024 h32/8 d128", "triton", 0.1, 55.0),
        row(f"decode {layers}L b1 ctx512 float16", "triton paged", 0.8, 55.0),
        row(f"decode {layers}L b1 ctx512 W4A16 g128", "triton paged", 0.4, 30.0),
    ]


# --- the targets ----------------------------------------------------------------------------------------


def test_measurements_that_meet_every_target_pass(bench):
    results = bench.check_targets(good_rows())
    assert results and all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    assert {r["kernel"] for r in results} == {r["kernel"] for r in good_rows()}  # each target matched a row
    assert all(r["why"] for r in results)


@pytest.mark.parametrize(
    "kernel, pct",
    [
        ("rms_norm + residual [4096x4096]", 49.9),
        ("silu_and_mul [4096x22016]", 10.0),
        ("rotary [8x32x512x128]", 29.0),
        ("paged attn b32 ctx1024 h32/8 d128", 12.0),
        ("decode 4L b1 ctx512 float16", 19.0),
        ("rms_norm + residual [4096x4096]", None),  # no peak known: cannot show the target is met
    ],
)
def test_a_kernel_below_its_target_fails(bench, kernel, pct):
    rows = [dict(r, pct_peak=pct) if r["kernel"] == kernel and "triton" in r["impl"] else r for r in good_rows()]
    failed = [r for r in bench.check_targets(rows) if not r["ok"]]
    assert [r["kernel"] for r in failed] == [kernel]


def test_only_the_targeted_implementation_counts(bench):
    """The eager RMSNorm at 30% of peak is a baseline, not a target: only the Triton row is checked."""
    results = bench.check_targets(good_rows())
    assert all(r["impl"] != "torch eager" for r in results)


def test_w4a16_decode_must_beat_the_fp16_step(bench):
    rows = good_rows(layers=3)
    assert all(r["ok"] for r in bench.check_targets(rows))
    slow = [dict(r, ms=0.8) if "W4A16" in r["kernel"] else r for r in rows]  # as slow as fp16: not faster
    (failed,) = [r for r in bench.check_targets(slow) if not r["ok"]]
    assert failed["kernel"] == "decode 3L b1 ctx512 W4A16 g128" and "decode 3L b1 ctx512 float16" in failed["required"]


def test_a_targeted_kernel_that_was_not_measured_fails(bench):
    rows = [r for r in good_rows() if not r["kernel"].startswith("silu")]
    (failed,) = [r for r in bench.check_targets(rows) if not r["ok"]]
    assert failed["kernel"] is None and failed["target"].startswith("silu") and failed["measured"] is None
    rows = [r for r in good_rows() if "float16" not in r["kernel"]]  # the W4A16 step has nothing to beat
    failed = [r for r in bench.check_targets(rows) if not r["ok"]]
    assert {r["target"] for r in failed} == {t.kernel for t in bench.TARGETS if "b?float16" in t.kernel} | {
        next(t.kernel for t in bench.TARGETS if t.faster_than)
    }


def test_every_target_states_a_threshold_and_why(bench):
    for t in bench.TARGETS:
        assert (t.min_pct_peak is None) != (t.faster_than is None), t
        assert len(t.why) > 40, t


# --- the summary ------------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu_branch" name="test_a[cuda]" time="1.0"/>
<testcase classname="tests.test_gpu_branch" name="test_b" time="1.0"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_all_or_nothing" name="test_c" time="0.1"><skipped message="no"/></testcase>
<testcase classname="tests.test_all_or_nothing" name="test_d" time="0.1"><error message="e">y</error></testcase>
</testsuite></testsuites>"""


def test_junit_counts_passed_failed_and_skipped():
    counts = summary_mod.read_junit(JUNIT)
    assert counts == dict(
        passed=1,
        failed=2,
        skipped=1,
        failures=["tests.test_gpu_branch::test_b", "tests.test_all_or_nothing::test_d"],
    )


def test_steps_need_name_rc_seconds_and_limit():
    assert summary_mod.read_steps('{"name": "a", "rc": 0, "seconds": 3, "limit": 10}\n\n') == [
        dict(name="a", rc=0, seconds=3, limit=10)
    ]
    with pytest.raises(ValueError, match="'b' lacks \\['limit'\\]"):
        summary_mod.read_steps('{"name": "b", "rc": 0, "seconds": 3}')


def test_summary_merges_the_steps(bench):
    steps = [dict(name="tests", rc=0, seconds=50, limit=100), dict(name="bench", rc=124, seconds=150, limit=150)]
    rows = good_rows()
    bench_json = dict(device="NVIDIA H200", peak_gbps=4800, copy_gbps=4100.0, pct_of="datasheet peak",
                      torch="2.9", triton="3.5", rows=rows, targets=bench.check_targets(rows))  # fmt: skip
    lessons = dict(checks=[["lesson 09 timing cell", True], ["lesson 10 W4A16 model", False]], failures=["lesson 10"])
    s = summary_mod.summarize(
        steps,
        bench=bench_json,
        junit={"tests": summary_mod.read_junit(JUNIT)},
        lessons=lessons,
        compile_table="logs/kernels_compile.json",
        env=dict(gpu=None, torch="2.9.1", triton=None),
    )
    assert s["ok"] is False and (s["seconds"], s["limit"]) == (200, 250)
    assert [(x["name"], x["ok"], x["timed_out"]) for x in s["steps"]] == [
        ("tests", True, False),
        ("bench", False, True),
    ]
    assert s["steps"][0]["tests"]["failed"] == 2 and "tests" not in s["steps"][1]
    assert (s["gpu"], s["torch"], s["triton"]) == ("NVIDIA H200", "2.9.1", "3.5")  # env first, then the bench's
    k = s["kernels"][1]
    assert k == dict(kernel="rms_norm + residual [4096x4096]", impl="triton", us=50.0, gbps=3840.0, pct_peak=80.0)
    assert len(s["targets"]) == len(rows) - 1 and s["compile_table"] == "logs/kernels_compile.json"
    assert s["lessons"] == dict(
        passed=["lesson 09 timing cell"], failed=["lesson 10 W4A16 model"], failures=["lesson 10"]
    )
    json.dumps(s, allow_nan=False)  # strict JSON


def test_summary_of_all_steps_passing_is_ok():
    s = summary_mod.summarize([dict(name="a", rc=0, seconds=1, limit=2)])
    assert s["ok"] is True and s["kernels"] == [] and s["lessons"] is None and s["targets"] is None
    assert summary_mod.summarize([])["ok"] is False  # nothing ran: not a pass


def test_main_writes_summary_json_from_the_log_folder(tmp_path, bench):
    (tmp_path / "steps.jsonl").write_text(
        '{"name": "tests", "rc": 0, "seconds": 5, "limit": 100}\n{"name": "lesson_tests", "rc": 1, "seconds": 9, '
        '"limit": 80}\n'
    )
    (tmp_path / "lesson_tests.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text(json.dumps(dict(rows=good_rows(), targets=[])))
    (tmp_path / "lessons.json").write_text("{not json")
    written = summary_mod.main([str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == json.loads(json.dumps(written))
    assert s["ok"] is False and s["steps"][1]["tests"]["failed"] == 2 and len(s["kernels"]) == len(good_rows())
    assert s["compile_table"] is None and s["lessons"]["failures"] == []


def test_gpu_check_steps_fit_in_eight_minutes():
    """Issue 14: gpu_check.sh runs in at most 8 minutes; each step is killed at its limit, so the limits bound it."""
    script = (BENCHMARKS / "gpu_check.sh").read_text()
    limits = dict(re.findall(r"^step (\w+) (\d+) ", script, re.MULTILINE))
    assert set(limits) == {"tests", "compile", "bench", "lessons", "lesson_tests"}
    assert sum(int(v) for v in limits.values()) <= 480, limits
    assert '--json "$LOGS/bench.json"' in script and 'gpu_summary.py "$LOGS"' in script
