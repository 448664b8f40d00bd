"""One place for measured results: lessons record rows, the capstone gathers them.

Rows live in $LABKIT_RESULTS_DIR/<profile>.json (default ~/.cache/labkit/results; on Colab with Google
Drive mounted, a folder on Drive: results_dir), keyed by
(lesson, method, setting): re-running a lesson replaces its rows. Reference numbers that the
lessons check live in labkit/references.json, per profile, each with its tolerance and origin.
Each check also keeps the value it measured under measured/<profile>/ in the same folder; only the
authors' command `python -m labkit.course --update-references` (or `--store-measured`) copies them
into references.json.

Every row carries its protocol (labkit.profiles.Protocol: model and dtype, text and copy, windows x
sequence length, calibration, BOS) and that protocol's fingerprint. Rows of different protocols are
not comparable: `pareto_front` and `baseline` refuse a mix, naming the fingerprints and what differs;
`by_protocol` groups rows first.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ._lesson_ids import is_lesson_id, lesson_id
from .folders import results_dir
from .profiles import PROTOCOL_FIELDS, Protocol, differences, fingerprint

if TYPE_CHECKING:
    from .profiles import Profile

REFERENCES_FILE = Path(__file__).with_name("references.json")
# Set by `python -m labkit.course --update-references` for its measuring run only: every check
# keeps its value and compares nothing, so one run measures every key, even those that moved.
MEASURE_ONLY_ENV = "LABKIT_MEASURE_ONLY"


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
    # Protocol.as_dict() of labkit.profiles (None: a row recorded by a labkit older than protocols) and
    # its fingerprint; record_run fills both from the profile.
    protocol: dict | None = None
    fingerprint: str = ""
    role: str = "result"  # one of ROLES


# What a row is, beside its numbers. Only "result" rows are compression results; an "original format" row
# reproduces the format the model was distributed in (SmolLM2's Q4_1: the same weights) and stays off the front;
# a "fine-tuned" row was trained on WikiText-2 after loading (a LoRA recovery, or its dense control), which lowers
# the perplexity on this very text by itself: it compares with its control, not with untrained rows; an "inference"
# row runs the same weights differently (lesson 10b), so it has nothing to place on a weight-memory front.
ROLES = {
    "result": "a compressed or otherwise changed model",
    "baseline": "the unchanged model, measured under this protocol",
    "original format": "the model's own stored format reproduced: not a compression result, kept off the Pareto front",
    "fine-tuned": "trained on WikiText-2 after loading (LoRA recovery or its dense control): compare it with its "
    "control, trained the same way; kept off the Pareto front",
    "inference": "the same weights run differently (speculative decoding, a compressed KV cache): changes speed or "
    "run-time memory, not the weights; kept off the Pareto front of weight memory",
}
FRONT_ROLES = ("result", "baseline")  # the roles pareto_front compares


def _path(profile: str) -> Path:
    return results_dir() / f"{profile}.json"


def load_rows(profile: str) -> list[Row]:
    path = _path(profile)
    if not path.exists():
        return []
    try:  # rows written before protocols were recorded load with protocol None: listed, never compared
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
    if not isinstance(row.role, str) or row.role not in ROLES:
        raise ValueError(f"Row.role={row.role!r}: allowed are {list(ROLES)}.")
    _check_protocol(row)


def _check_protocol(row: Row) -> None:
    """The row's protocol is complete, its fingerprint is the protocol's, and the row's own columns agree with it."""
    if not isinstance(row.protocol, dict) or set(row.protocol) != set(PROTOCOL_FIELDS):
        got = sorted(map(str, row.protocol)) if isinstance(row.protocol, dict) else repr(row.protocol)
        raise ValueError(
            f"Row.protocol={got}: a recorded result needs its whole protocol, a dict with the keys "
            f"{list(PROTOCOL_FIELDS)} (Profile.protocol(...).as_dict(); results.record_run fills it from the profile)."
        )
    try:
        expected = fingerprint(row.protocol)
    except TypeError as err:  # a value JSON cannot write
        raise ValueError(f"Row.protocol={row.protocol!r}: its values must be plain JSON ({err}).") from err
    if row.fingerprint != expected:
        raise ValueError(f"Row.fingerprint={row.fingerprint!r}: the fingerprint of Row.protocol is {expected!r}.")
    kind = row.data.split(":", 1)[0]
    for name, value, stated in (
        ("model", row.model, row.protocol["model"]),
        ("seqlen", row.seqlen, row.protocol["seqlen"]),
        ("eval_windows", row.eval_windows, row.protocol["eval_windows"]),
        ("data", kind, row.protocol["copy"]),
    ):
        if value != stated:
            raise ValueError(f"Row.{name}={getattr(row, name)!r} disagrees with its protocol ({stated!r}).")


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


def record_run(
    profile: Profile,
    lesson: str,
    method: str,
    setting: str,
    *,
    params: int,
    weight_bytes: int,
    perplexity: float | None,
    data: str,
    eval_windows: int | None,
    seqlen: int | None = None,
    runtime_bytes: int | None = None,
    tokens_per_s: float | None = None,
    device: str | None = None,
    note: str = "",
    role: str = "result",
) -> Row:
    """Record one measured row under `profile`'s protocol; returns the Row.

    The profile gives the row's profile name, model, protocol (profile.protocol(eval_windows, seqlen=seqlen,
    data=data): dtype, calibration and BOS come from the profile) and, unless given, the perplexity's
    seqlen and the device. eval_windows: the test windows the perplexity averaged (profile.eval_windows,
    or profile.sweep_windows for a sweep); data: where the test text came from (labkit.data.Text.source).
    role: "result" (a compressed model), "baseline" (the unchanged model), "original format", "fine-tuned" or
    "inference" (ROLES).
    """
    seqlen = profile.seqlen if seqlen is None else seqlen
    protocol = profile.protocol(eval_windows, seqlen=seqlen, data=data)
    return record(
        Row(
            lesson=lesson,
            method=method,
            setting=setting,
            profile=profile.name,
            model=profile.model,
            params=params,
            weight_bytes=weight_bytes,
            runtime_bytes=runtime_bytes,
            tokens_per_s=tokens_per_s,
            perplexity=perplexity,
            seqlen=seqlen,
            eval_windows=eval_windows,
            data=data,
            device=str(profile.device) if device is None else device,
            note=note,
            protocol=protocol.as_dict(),
            fingerprint=protocol.fingerprint,
            role=role,
        )
    )


def table(rows: list[Row]) -> str:
    """A plain-text table of rows, in the survey's column order, with each row's protocol fingerprint.

    A row that is not a compression result shows its role after the setting ("[baseline]", "[original
    format]"); a row recorded without a protocol shows "none" (re-run its lesson)."""
    from .evaluate import format_bytes

    head = ["lesson", "method", "setting", "params (M)", "weights", "runtime mem", "tok/s", "perplexity", "protocol"]
    body = []
    for r in sorted(rows, key=lambda r: r.lesson):
        body.append(
            [
                r.lesson,
                r.method,
                r.setting if r.role == "result" else f"{r.setting} [{r.role}]",
                f"{r.params / 1e6:.1f}",
                format_bytes(r.weight_bytes),
                format_bytes(r.runtime_bytes) if r.runtime_bytes is not None else "-",
                f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-",
                f"{r.perplexity:.2f}" if r.perplexity is not None else "-",
                r.fingerprint or "none",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def _lesson(name: str) -> str:
    """The lesson id of a row's lesson ('05b' from '05b_awq_and_qlora', labkit.course.lesson_id); a name that
    is no lesson's, as it is (messages about rows never fail on the name)."""
    try:
        return lesson_id(name)
    except (TypeError, ValueError):
        return str(name)


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
            f"first (python -m labkit.course {' '.join(_lesson(name) for name in lessons)}), on the same profile."
        )
    return [by_key[key] for key in wanted]


def require_lessons(rows: list[Row], lessons: list[str]) -> list[Row]:
    """The rows of `lessons` (names like "05_gptq"), in lesson order; fails loudly when a lesson recorded none."""
    missing = [lesson for lesson in lessons if not any(r.lesson == lesson for r in rows)]
    if missing:
        raise LookupError(
            f"No recorded rows from lesson(s) {missing} in {results_dir()}. Run them first, on the same "
            f"profile (python -m labkit.course {' '.join(_lesson(name) for name in missing)})."
        )
    return sorted((r for r in rows if r.lesson in lessons), key=lambda r: lessons.index(r.lesson))


def protocols(rows: list[Row]) -> str:
    """One line per protocol among `rows`, in first-seen order: its fingerprint, what it fixes, and its lessons
    (the legend of table's last column). Rows recorded without a protocol get a line saying so."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.fingerprint if r.protocol is not None else "", []).append(r)
    lines = []
    for key, group in groups.items():
        lessons = ", ".join(sorted({_lesson(r.lesson) for r in group}))
        what = Protocol(**group[0].protocol).describe() if key else "none: recorded without a protocol (re-run them)"
        lines.append(f"{what} (lessons {lessons})")
    return "\n".join(lines)


def _refuse_unrecorded(rows: list[Row], what: str) -> None:
    old = [r for r in rows if r.protocol is None]
    if old:
        lessons = sorted({r.lesson for r in old})
        raise ValueError(
            f"{what}: {len(old)} row(s) of lesson(s) {lessons} were recorded without their protocol (by an older "
            f"labkit), so nothing says which numbers they compare with. Re-run them (python -m labkit.course "
            f"{' '.join(_lesson(name) for name in lessons)}), on the same profile, to record it."
        )


def by_protocol(rows: list[Row]) -> dict[str, list[Row]]:
    """`rows` grouped by protocol fingerprint, groups and rows in the order given.

    Raises ValueError for a row recorded without a protocol (it could belong to any group)."""
    _refuse_unrecorded(rows, "by_protocol")
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.fingerprint, []).append(r)
    return groups


def one_protocol(rows: list[Row], what: str = "these rows") -> str | None:
    """The fingerprint every row of `rows` shares (None for no rows). Rows measured under different protocols
    do not compare: ValueError naming each fingerprint, its lessons, and what differs from the first."""
    groups = by_protocol(rows)
    if len(groups) <= 1:
        return next(iter(groups), None)
    first = next(iter(groups.values()))[0].protocol
    parts = []
    for key, group in groups.items():
        lessons = ", ".join(sorted({r.lesson for r in group}))
        diff = differences(first, group[0].protocol)
        parts.append(
            f"{key} ({len(group)} rows: {lessons})" + (f", which differs in {'; '.join(diff)}" if diff else "")
        )
    raise ValueError(
        f"{what}: rows measured under {len(groups)} protocols cannot be compared: {' and '.join(parts)}. "
        f"Compare within one protocol: results.by_protocol(rows) groups them."
    )


def baseline(rows: list[Row], missing_ok: bool = False) -> Row | None:
    """The first row with role "baseline" (the unchanged model) among `rows`, which must share one protocol.

    No such row: LookupError naming the protocol, or None with missing_ok=True."""
    key = one_protocol(rows, "baseline")
    found = [r for r in rows if r.role == "baseline"]
    if found or missing_ok:
        return found[0] if found else None
    lessons = sorted({r.lesson for r in rows})
    raise LookupError(
        f"No baseline (role 'baseline') among the rows of protocol {key} (lessons {lessons}): measure the unchanged "
        f"model under that protocol and record it with results.record_run(..., role='baseline')."
    )


def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows not dominated in (weight_bytes, perplexity): no other row is smaller AND at least as good.

    All rows must share one protocol (else ValueError naming the fingerprints and what differs; group them
    with by_protocol). Sorted by weight memory. Rows without a perplexity, and rows whose role is not in
    FRONT_ROLES ("original format": the model as it was distributed; "fine-tuned": trained on the text it is
    scored on), are left out."""
    one_protocol(rows, "pareto_front")
    scored = sorted(
        (r for r in rows if r.perplexity is not None and r.role in FRONT_ROLES),
        key=lambda r: (r.weight_bytes, r.perplexity),
    )
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


def check_reference(key: str, value: float, profile: str, data: str | None = None, *, missing_ok: bool = False) -> str:
    """Compare a measured `value` with the stored reference for `profile`, within its tolerance.

    data: the source of the test text (labkit.data.Text.source). A reference measured on the
    local copy of WikiText-2 is not comparable with a run on the Hub's copy (their blank lines
    differ), so that case is reported, not checked. Raises AssertionError (naming both numbers)
    when outside the tolerance; otherwise returns a one-line verdict made only of stored values,
    so it prints identically on every run. missing_ok: when `key` has no value for this profile
    (a toy run that no published number matches), say so instead of raising KeyError.

    The measured value is also kept in the results folder (`measured_dir(profile)`), where
    `python -m labkit.course --update-references` finds it; references.json itself is never written here.
    """
    _keep_measured(key, value, profile, data)
    if os.environ.get(MEASURE_ONLY_ENV) == "1":
        return f"MEASURED {key}: {value:.6g} on the {profile} profile, not compared (labkit.course --update-references)"
    if missing_ok and profile not in references().get(key, {profile: None}):
        return f"no {profile}-profile reference for {key}; measured {value:.4g}"
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


def measured_dir(profile: str) -> Path:
    """Where check_reference keeps the last value measured for each reference key of `profile`."""
    return results_dir() / "measured" / profile


def _measured_path(key: str, profile: str) -> Path:
    return measured_dir(profile) / (key.replace("/", "--") + ".json")  # keys look like "05/gptq-w4/perplexity"


def _keep_measured(key: str, value: float, profile: str, data: str | None) -> None:
    path = _measured_path(key, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "value": float(value), "data": (data or "local").split(":")[0]}))
    tmp.replace(path)  # atomic: lessons run in parallel under nbval may check at once


def measured(profile: str, since: float | None = None) -> dict[str, dict]:
    """The values check_reference last measured on `profile`: {key: {"key", "value", "data"}}.

    since: a time.time() value; only values measured after it."""
    paths = [p for p in sorted(measured_dir(profile).glob("*.json")) if since is None or p.stat().st_mtime >= since]
    return {e["key"]: e for e in (json.loads(p.read_text()) for p in paths)}


def _prefixes(prefix: str, key: str) -> bool:
    """Whether `prefix` names reference key `key`: a lesson id names its lesson's keys ('05' names '05/gptq-w4/...',
    not lesson 05b's '05b/awq-w4-grouped/...'; '00' names '00_baseline/perplexity'); any other prefix, the keys
    it starts."""
    return _lesson(key.split("/", 1)[0]) == prefix if is_lesson_id(prefix) else key.startswith(prefix)


def update_references(
    prefixes: list[str] | None = None, since: float | None = None, rtol: float = 0.02
) -> list[tuple[str, float | None, float]]:
    """Authors only: store the last measured CPU-profile values in references.json.

    prefixes: reference keys to update: a lesson id ("05": lesson 05's keys, not 05b's), or any prefix of keys;
    None updates every measured key. since: only values measured after this time.time().
    Only CPU-profile entries are written: published GPU-profile values are never overwritten. An
    existing entry keeps its tolerance and origin; a new entry gets rtol 2% (compressed models go
    through masks and factorizations whose ties can break differently on other CPUs).
    Returns the changes as (key, old value or None, new value).
    """
    found = measured("cpu", since)
    if prefixes:
        found = {k: e for k, e in found.items() if any(_prefixes(p, k) for p in prefixes)}
    if not found:
        raise LookupError(
            f"No measured CPU-profile values{' for ' + str(prefixes) if prefixes else ''} in {measured_dir('cpu')}. "
            "Run the lessons on the CPU profile first (python -m labkit.course ..., or in JupyterLab): each "
            "reference check keeps what it measured there."
        )
    refs = references()
    changes = []
    for key, e in sorted(found.items()):
        if not math.isfinite(e["value"]):
            raise ValueError(f"{key}: the measured value is {e['value']}; a reference must be finite.")
        entry = refs.setdefault(key, {}).setdefault("cpu", {"rtol": rtol, "origin": "measured by this code"})
        old = entry.get("value")
        entry["value"] = round(e["value"], 4)
        entry["data"] = e["data"]
        changes.append((key, old, entry["value"]))
    tmp = REFERENCES_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(refs, indent=2) + "\n")
    tmp.replace(REFERENCES_FILE)
    return changes


def field_names() -> list[str]:
    return [f.name for f in fields(Row)]
