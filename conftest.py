"""pytest's root conftest, loaded also when only lessons are collected (pytest notebooks/09_*.ipynb): the lessons'
exercises run with the worked solutions plugged in (labkit.solutions, check.use), so nbval proves that a right
answer passes and reproduces every checked number.

At the end of a run it prints each lesson's time under nbval (all its cells, kernel start included) and the
unit tests' time, beside a measure of how busy the machine was: an fp32 matrix product's GFLOP/s and a memory
copy's GB/s, taken at the start and at the end of the run (issue 16: the suite's time, lesson by lesson)."""

import os
from collections import defaultdict

os.environ.setdefault("LABKIT_SOLUTIONS", "1")

_seconds = defaultdict(float)  # test file -> seconds (setup, call and teardown of its items)
_machine = {}  # "start" / "end" -> (GFLOP/s, GB/s)


def machine_speed(repeats: int = 20) -> tuple[float, float]:
    """(GFLOP/s of a [512, 576] @ [576, 1536] fp32 product: one of SmolLM2's MLP projections on a
    512-token window; GB/s of copying 256 MiB), the best of `repeats` each, on torch's default threads."""
    import torch

    from labkit.evaluate import best_time

    x, w = torch.randn(512, 576), torch.randn(576, 1536)
    src, dst = torch.empty(64 * 2**20), torch.empty(64 * 2**20)  # 256 MiB each
    mm, copy = best_time(lambda: x @ w, repeats), best_time(lambda: dst.copy_(src), repeats)
    return 2 * 512 * 576 * 1536 / mm / 1e9, 2 * src.numel() * 4 / copy / 1e9  # copy: read + write


def pytest_sessionstart(session):
    _machine["start"] = machine_speed()


def pytest_runtest_logreport(report):
    _seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    _machine["end"] = machine_speed()
    lessons = {f: s for f, s in _seconds.items() if f.endswith(".ipynb")}
    others = sum(s for f, s in _seconds.items() if not f.endswith(".ipynb"))
    write = terminalreporter.write_line
    terminalreporter.section("suite time")
    for name, (gflops, gbps) in _machine.items():
        write(f"machine at the {name}: fp32 matmul {gflops:.0f} GFLOP/s, memory copy {gbps:.1f} GB/s")
    for f, s in sorted(lessons.items()):
        write(f"{os.path.basename(f):<45} {s:7.0f} s")
    if lessons:
        write(f"{'lessons (nbval)':<45} {sum(lessons.values()):7.0f} s  ({sum(lessons.values()) / 60:.1f} min)")
    write(f"{'everything else (unit tests)':<45} {others:7.0f} s  ({others / 60:.1f} min)")
