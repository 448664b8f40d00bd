"""Run the course: execute the lessons in order, then print the results table.

    python -m labkit.course                 # executed copies go to build/executed/
    python -m labkit.course --in-place 00   # re-execute lesson 00 and store its outputs (authors)
    python -m labkit.course --update-references 01   # store lesson 01's newly measured CPU references (authors)
    python -m labkit.course --store-measured 01      # store what lesson 01's checks last measured, run nothing

The exercises run with their worked solutions plugged in (LABKIT_SOLUTIONS=1, labkit.solutions), as
under CI, so every number is the one the stored outputs show; in JupyterLab your own code runs.

Executed notebooks keep their outputs but not live widget views (tqdm bars, sliders): those need
a running kernel, and a stored copy of them would render as an error in the book.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# The rule of lesson ids ('05b' follows '05', precedes '06'), from its leaf module (which labkit.results and
# labkit.runtime import without importing this runner); the book and the tests take it from here.
from ._lesson_ids import LESSON_GLOB, LESSON_ID, LESSON_NAME, is_lesson, is_lesson_id, lesson_id  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _selects(prefix: str, path: Path) -> bool:
    """'05' selects lesson 05 only (not 05b); a longer prefix ('05_gp', '05b_awq') selects the names it starts."""
    return lesson_id(path) == prefix if is_lesson_id(prefix) else path.name.startswith(prefix)


def lessons(notebook_dir: Path = ROOT / "notebooks", select: list[str] | None = None) -> list[Path]:
    """The lessons in notebook_dir in course order, by id ('05' < '05b' < '06'); select: ids or name prefixes."""
    found = sorted((p for p in notebook_dir.glob(LESSON_GLOB) if is_lesson(p)), key=lambda p: (lesson_id(p), p.name))
    if select:
        found = [p for p in found if any(_selects(s, p) for s in select)]
        if not found:
            raise SystemExit(f"No lesson matches {select}; lessons are named like 00_baseline.ipynb.")
    return found


def strip_widgets(nb) -> None:
    """Drop live-widget outputs and the saved widget state; keep every other output."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data:
                if set(data) - {WIDGET_MIME, "text/plain"}:  # a still fallback exists: keep it
                    data.pop(WIDGET_MIME)
                    data.pop("text/plain", None)
                    kept.append(out)
                continue
            kept.append(out)
        cell.outputs = kept


def execute(path: Path, out_path: Path, timeout: int = 1800, env: dict[str, str] | None = None) -> float:
    """Execute one notebook top to bottom in its own folder; returns the seconds it took.

    env: the kernel's environment variables (default: this process's)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute(**({} if env is None else {"env": env}))  # env=None would reach the kernel launcher as None
    strip_widgets(nb)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_path)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("select", nargs="*", help="lessons to run, by id (00 05b) or name prefix (default: all)")
    parser.add_argument("--in-place", action="store_true", help="store outputs in notebooks/ (authors only)")
    parser.add_argument("--out", default=str(ROOT / "build" / "executed"), help="folder for executed copies")
    parser.add_argument(
        "--update-references",
        action="store_true",
        help="authors, after a deliberate change: run the lessons with their reference checks only measuring, store "
        "the CPU-profile values measured in labkit/references.json, then re-run the lessons --in-place",
    )
    parser.add_argument(
        "--store-measured",
        action="store_true",
        help="authors: run nothing; store the CPU-profile values the selected lessons' checks last measured (e.g. "
        "in JupyterLab) in labkit/references.json",
    )
    args = parser.parse_args(argv)

    from . import profiles, results, solutions

    if args.store_measured:
        try:
            changes = results.update_references(args.select or None)
        except LookupError as err:
            raise SystemExit(str(err)) from err
        print_changes(changes)
        return

    os.environ.setdefault(solutions.ENV, "1")  # the exercises run with the worked solutions, as under CI
    profile = profiles.get()
    print(f"Profile {profile.name!r}: {profile.model}, seqlen {profile.seqlen}. Results go to {results.results_dir()}.")
    selected = lessons(select=args.select)
    if args.update_references:
        update_references(selected, Path(args.out), profile.name)
        args.in_place = True
    for path in selected:
        target = path if args.in_place else Path(args.out) / path.name
        print(f"  running {path.name} ...", flush=True)
        seconds = execute(path, target)
        print(f"  {path.name}: done in {seconds:.0f} s -> {target}", flush=True)
    rows = results.load_rows(profile.name)
    print(f"\nResults ({profile.name} profile, {len(rows)} rows):\n")
    print(results.table(rows) + "\n\n" + results.protocols(rows) if rows else "(no rows recorded)")


def update_references(paths: list[Path], out: Path, profile: str) -> None:
    """Run `paths` to measure, then write what their reference checks measured to references.json (CPU only)."""
    from . import results

    if profile != "cpu":
        raise SystemExit(
            f"--update-references stores CPU-profile references; this is the {profile!r} profile "
            "(published GPU-profile values are never overwritten). Set LABKIT_PROFILE=cpu."
        )
    start = time.time()
    env = {**os.environ, results.MEASURE_ONLY_ENV: "1"}  # this run's kernels only
    for path in paths:
        print(f"  measuring {path.name} ...", flush=True)
        execute(path, out / path.name, env=env)
    print_changes(results.update_references([lesson_id(path) for path in paths], since=start))
    print("  storing the outputs:")


def print_changes(changes: list[tuple[str, float | None, float]]) -> None:
    from . import results

    for key, old, new in changes:
        print(f"  {key}: {'(new)' if old is None else old} -> {new}")
    print(f"  {len(changes)} CPU-profile reference(s) written to {results.REFERENCES_FILE}.")


if __name__ == "__main__":
    main()
