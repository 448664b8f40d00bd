"""One place for measured results: lessons record rows, the capstone gathers them.

Rows live in $LABKIT_RESULTS_DIR/<profile>.json (default ~/.cache/labkit/results), keyed by
(lesson, method, setting): re-running a lesson replaces its rows. Reference numbers that the
lessons check live in labkit/references.json, per profile, each with its tolerance and origin.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REFERENCES_FILE = Path(__file__).with_name("references.json")


@dataclass
class Row:
    lesson: str  # e.g. "00_baseline"
    method: str  # e.g. "FP32 baseline", "GPTQ"
    setting: str  # e.g. "-", "W4 g128", "50% 2:4"
    profile: str
    model: str
    params: int
    weight_bytes: int
    runtime_bytes: int | None  # peak runtime memory of generation (labkit.evaluate.peak_memory)
    tokens_per_s: float | None  # decode speed with the KV cache
    perplexity: float | None
    seqlen: int
    eval_windows: int | None  # None: the whole test split
    data: str  # where the test text came from (labkit.data.Text.source)
    device: str
    note: str = ""


def results_dir() -> Path:
    return Path(os.environ.get("LABKIT_RESULTS_DIR") or Path.home() / ".cache" / "labkit" / "results")


def _path(profile: str) -> Path:
    return results_dir() / f"{profile}.json"


def load_rows(profile: str) -> list[Row]:
    path = _path(profile)
    if not path.exists():
        return []
    try:
        return [Row(**r) for r in json.loads(path.read_text(encoding="utf-8"))]
    except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is not a readable results file ({type(err).__name__}: {str(err)[:200]}). It was cut off or "
            f"edited by hand: move it away or delete it; re-running the lessons records their rows again."
        ) from err


_TEXT = ("lesson", "method", "setting", "profile", "model", "data", "device", "note")


def _check_row(row: Row) -> None:
    """Every field of the right type and range, named in the error: a bad value never reaches the file."""
    if not isinstance(row, Row):
        raise ValueError(f"row must be a labkit.results.Row, got {type(row).__name__}.")
    for name in _TEXT:
        if not isinstance(getattr(row, name), str):
            raise ValueError(f"Row.{name}={getattr(row, name)!r}: need a string.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", row.profile) or row.profile.startswith("."):
        raise ValueError(f"Row.profile={row.profile!r}: need a profile name such as 'cpu' (it names the file).")
    bounds = {"params": 0, "weight_bytes": 0, "runtime_bytes": 0, "tokens_per_s": 0, "perplexity": 1}
    for name, low in bounds.items():
        value = getattr(row, name)
        if value is None and name in ("runtime_bytes", "tokens_per_s", "perplexity"):
            continue
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low:
            raise ValueError(f"Row.{name}={value!r}: a recorded measurement must be a finite number >= {low}.")
    for name, low in (("seqlen", 1), ("eval_windows", 1)):
        value = getattr(row, name)
        if value is None and name == "eval_windows":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(
                f"Row.{name}={value!r}: need an integer >= {low}" + (" or None." if name == "eval_windows" else ".")
            )


def record(row: Row) -> Row:
    """Add `row` to its profile's results, replacing a row with the same (lesson, method, setting).

    A bad field raises ValueError naming it; a results file that cannot be read raises ValueError
    naming the file. In both cases nothing is written."""
    _check_row(row)
    key = (row.lesson, row.method, row.setting)
    rows = [r for r in load_rows(row.profile) if (r.lesson, r.method, r.setting) != key] + [row]
    path = _path(row.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    tmp.replace(path)  # atomic: a crash never leaves a half-written file
    return row


def table(rows: list[Row]) -> str:
    """A plain-text table of rows, in the survey's column order."""
    from .evaluate import format_bytes

    head = ["lesson", "method", "setting", "params (M)", "weights", "runtime mem", "tok/s", "perplexity"]
    body = []
    for r in sorted(rows, key=lambda r: r.lesson):
        body.append(
            [
                r.lesson,
                r.method,
                r.setting,
                f"{r.params / 1e6:.1f}",
                format_bytes(r.weight_bytes),
                format_bytes(r.runtime_bytes) if r.runtime_bytes is not None else "-",
                f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-",
                f"{r.perplexity:.2f}" if r.perplexity is not None else "-",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def require(rows: list[Row], wanted: list[tuple[str, str, str]]) -> list[Row]:
    """The rows for `wanted` (lesson, method, setting) keys, in that order; fails loudly when one is missing.

    The capstone gathers what earlier lessons recorded; a missing row means a lesson was not run
    (or was run on another profile), and a table with a silent gap would mislead."""
    by_key = {(r.lesson, r.method, r.setting): r for r in rows}
    missing = [key for key in wanted if key not in by_key]
    if missing:
        lessons = sorted({lesson for lesson, _, _ in missing})
        raise LookupError(
            f"{len(missing)} result row(s) missing from {results_dir()}: {missing}. Run lesson(s) {lessons} "
            f"first (python -m labkit.course {' '.join(name[:2] for name in lessons)}), on the same profile."
        )
    return [by_key[key] for key in wanted]


def require_lessons(rows: list[Row], lessons: list[str]) -> list[Row]:
    """The rows of `lessons` (names like "05_gptq"), in lesson order; fails loudly when a lesson recorded none."""
    missing = [lesson for lesson in lessons if not any(r.lesson == lesson for r in rows)]
    if missing:
        raise LookupError(
            f"No recorded rows from lesson(s) {missing} in {results_dir()}. Run them first, on the same "
            f"profile (python -m labkit.course {' '.join(name[:2] for name in missing)})."
        )
    return sorted((r for r in rows if r.lesson in lessons), key=lambda r: lessons.index(r.lesson))


def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows not dominated in (weight_bytes, perplexity): no other row is smaller AND at least as good.

    Sorted by weight memory. Rows without a perplexity are left out."""
    scored = sorted((r for r in rows if r.perplexity is not None), key=lambda r: (r.weight_bytes, r.perplexity))
    front, best = [], math.inf
    for r in scored:
        if r.perplexity < best:
            front.append(r)
            best = r.perplexity
    return front


# --- reference numbers ---------------------------------------------------------------------------


def references() -> dict:
    return json.loads(REFERENCES_FILE.read_text())


def reference(key: str, profile: str) -> dict:
    refs = references()
    if key not in refs:
        raise KeyError(f"No reference number {key!r} in {REFERENCES_FILE.name}; known: {sorted(refs)}.")
    if profile not in refs[key]:
        raise KeyError(f"Reference {key!r} has no value for profile {profile!r} (has {sorted(refs[key])}).")
    return refs[key][profile]


def check_reference(key: str, value: float, profile: str, data: str | None = None) -> str:
    """Compare a measured `value` with the stored reference for `profile`, within its tolerance.

    data: the source of the test text (labkit.data.Text.source). A reference measured on the
    local copy of WikiText-2 is not comparable with a run on the Hub's copy (their blank lines
    differ), so that case is reported, not checked. Raises AssertionError (naming both numbers)
    when outside the tolerance; otherwise returns a one-line verdict made only of stored values,
    so it prints identically on every run.
    """
    if os.environ.get("LABKIT_UPDATE_REFERENCES") == "1" and profile == "cpu":
        _update_reference(key, value, profile, data)
    ref = reference(key, profile)
    target, rtol, origin = ref["value"], ref["rtol"], ref["origin"]
    ref_kind, run_kind = ref.get("data"), (data or "").split(":")[0] or None
    if ref_kind and run_kind and ref_kind != run_kind:
        return (
            f"NOT CHECKED {key}: the {profile}-profile reference {target:g} was measured on the {ref_kind} "
            f"copy of WikiText-2 and this run read the {run_kind} copy; measured {value:.4g}."
        )
    if not math.isfinite(value) or abs(value - target) > rtol * abs(target):
        raise AssertionError(
            f"{key}: measured {value:.4g}, but the {profile}-profile reference is {target:.4g} "
            f"± {100 * rtol:g}% ({origin}). Something changed the result: the model, the data, "
            f"the protocol or the code."
        )
    return f"OK {key}: within ±{100 * rtol:g}% of the {profile}-profile reference {target:g} ({origin})"


def _update_reference(key: str, value: float, profile: str, data: str | None, rtol: float = 0.02) -> None:
    """Authors only (LABKIT_UPDATE_REFERENCES=1): store a freshly measured CPU-profile value.

    Keeps an existing entry's tolerance and origin; a new entry gets rtol 2% (compressed models
    go through masks and factorizations whose ties can break differently on other CPUs)."""
    import fcntl  # authors' machines only (Linux/macOS); several lessons may update at once

    with open(REFERENCES_FILE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refs = references()
        entry = refs.setdefault(key, {}).setdefault(profile, {"rtol": rtol, "origin": "measured by this code"})
        entry["value"] = round(float(value), 4)
        entry["data"] = (data or "local").split(":")[0]
        tmp = REFERENCES_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(refs, indent=2) + "\n")
        tmp.replace(REFERENCES_FILE)


def field_names() -> list[str]:
    return [f.name for f in fields(Row)]
