"""The JSON summary of benchmarks/gpu_check.sh: one file from what each step left in the log folder.

    python benchmarks/gpu_summary.py LOGS      # writes LOGS/summary.json; exit status 0

Reads (each optional; what is missing is recorded as null):
  LOGS/steps.jsonl             one line per step: {"name", "rc", "seconds", "limit"} (written by gpu_check.sh)
  LOGS/bench.json              bench_kernels.py --json: rows (GB/s, % of peak per kernel) and target checks
  LOGS/kernels_compile.json    python -m labkit.kernels.offline --json (only its path is recorded)
  LOGS/<step>.xml              pytest --junitxml of a step: tests passed, failed, skipped
  LOGS/lessons.json            the lessons step's checks: {"checks": [[name, ok], ...], "failures": [...]}
The summary: {"ok", "gpu", "torch", "triton", "steps": [...], "kernels": [...], "targets": [...],
"compile_table", "lessons"}; "ok" is true when every step exited 0 within its limit.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(text: str) -> list[dict]:
    """steps.jsonl's lines (blank lines skipped), each {"name", "rc", "seconds", "limit"}."""
    steps = [json.loads(line) for line in text.splitlines() if line.strip()]
    for s in steps:
        missing = {"name", "rc", "seconds", "limit"} - s.keys()
        if missing:
            raise ValueError(f"steps.jsonl: step {s.get('name')!r} lacks {sorted(missing)}")
    return steps


def read_junit(text: str) -> dict:
    """{"passed", "failed", "skipped", "failures": [test ids]} from pytest's --junitxml output."""
    root = ET.fromstring(text)
    passed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return dict(passed=passed, failed=len(failures), skipped=skipped, failures=failures)


def kernel_rows(bench: dict) -> list[dict]:
    """The bench rows, each {"kernel", "impl", "us", "gbps", "pct_peak"} (rounded for reading)."""

    def rnd(x, digits):
        return None if x is None or x != x else round(x, digits)

    return [
        dict(kernel=r["kernel"], impl=r["impl"], us=rnd(1e3 * r["ms"], 2), gbps=rnd(r["gbps"], 1),
             pct_peak=rnd(r.get("pct_peak"), 1))
        for r in bench.get("rows", [])
    ]  # fmt: skip


def summarize(
    steps: list[dict],
    bench: dict | None = None,
    junit: dict[str, dict] | None = None,
    lessons: dict | None = None,
    compile_table: str | None = None,
    env: dict | None = None,
) -> dict:
    """Merge the steps' results. steps: read_steps(...); bench: bench_kernels.py's --json; junit: step name
    -> read_junit(...); lessons: the lessons step's JSON; env: {"gpu", "torch", "triton"}."""
    env = env or {}
    junit = junit or {}
    out_steps = []
    for s in steps:
        step = dict(name=s["name"], rc=s["rc"], seconds=s["seconds"], limit=s["limit"], ok=s["rc"] == 0)
        step["timed_out"] = s["rc"] in (124, 137)
        if s["name"] in junit:
            step["tests"] = junit[s["name"]]
        out_steps.append(step)
    bench = bench or {}
    lesson_checks = None
    if lessons is not None:
        checks = lessons.get("checks", [])
        lesson_checks = dict(
            passed=[n for n, ok in checks if ok],
            failed=[n for n, ok in checks if not ok],
            failures=lessons.get("failures", []),
        )
    return dict(
        ok=bool(out_steps) and all(s["ok"] for s in out_steps),
        gpu=env.get("gpu") or bench.get("device"),
        torch=env.get("torch") or bench.get("torch"),
        triton=env.get("triton") or bench.get("triton"),
        seconds=sum(s["seconds"] for s in out_steps),
        limit=sum(s["limit"] for s in out_steps),
        steps=out_steps,
        peak_gbps=bench.get("peak_gbps"),
        copy_gbps=bench.get("copy_gbps"),
        pct_of=bench.get("pct_of"),
        kernels=kernel_rows(bench),
        targets=bench.get("targets"),
        compile_table=compile_table,
        lessons=lesson_checks,
    )


def environment() -> dict:
    """GPU name, torch and triton versions of this Python (None for what is not there)."""
    env = dict(gpu=None, torch=None, triton=None)
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
    except Exception:  # the summary is written even when torch is broken: that is what it reports
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    return env


def _json(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError as err:
        return dict(error=f"{path.name}: {err}")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/gpu_summary.py LOGS")
    logs = Path(argv[0])
    steps_file = logs / "steps.jsonl"
    steps = read_steps(steps_file.read_text()) if steps_file.exists() else []
    junit = {}
    for s in steps:
        xml = logs / f"{s['name']}.xml"
        if xml.exists():
            try:
                junit[s["name"]] = read_junit(xml.read_text())
            except ET.ParseError as err:
                junit[s["name"]] = dict(error=str(err))
    table = logs / "kernels_compile.json"
    summary = summarize(
        steps,
        bench=_json(logs / "bench.json"),
        junit=junit,
        lessons=_json(logs / "lessons.json"),
        compile_table=str(table) if table.exists() else None,
        env=environment(),
    )
    (logs / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {logs / 'summary.json'}: ok={summary['ok']}, {summary['seconds']} s of {summary['limit']} s")
    return summary


if __name__ == "__main__":
    main()
