"""Every stored output of every lesson is fit to publish: no machine's absolute path, no traceback, no stderr.

A stored output is what a learner reads in the book and on GitHub, and what nbval compares. A path such as
/home/someone/... says where the author's files were, not anything about the lesson; a traceback or a
stderr stream (a warning, a progress bar) means the lesson did not run cleanly when it was stored. Fix a
finding by fixing the lesson and re-executing it (python -m labkit.course --in-place NN), never by editing
the stored output.
"""

import json
import re
from pathlib import Path

import pytest

from labkit.course import lesson_id, lessons

NOTEBOOKS = lessons(Path(__file__).resolve().parent.parent / "notebooks")

# (lesson file, cell index) -> why its stderr output is acceptable. Empty today: every lesson runs clean.
STDERR_ALLOWED: dict[tuple[str, int], str] = {}

# An absolute path on a learner's or author's machine: a Unix home, root, scratch or work folder, macOS
# /Users, Colab's /content, or a Windows drive. Not preceded by a word character, dot, colon or slash, so
# URLs (https://github.com/home/...) and relative paths (../build/x) do not count.
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/~-])(?:/(?:work|home|root|tmp|Users|content|mnt|var/folders|private)(?=/|\b)|[A-Za-z]:\\(?=\w))"
)
# A printed traceback (an error caught and printed on purpose, "ValueError: ...", is a lesson's demonstration).
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"[^\"]+\", line \d+", re.MULTILINE)
# Text outputs scanned; images are base64 and LaTeX has backslashes of its own.
TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "application/json")


def output_texts(output: dict) -> list[tuple[str, str]]:
    """(kind, text) pairs of one stored output: stream text, each text mime, an error's traceback."""
    kind = output.get("output_type")
    if kind == "stream":
        return [(f"stream {output.get('name')}", _text(output.get("text", "")))]
    if kind == "error":
        return [("error", "\n".join([output.get("ename", ""), output.get("evalue", ""), *output.get("traceback", [])]))]
    data = output.get("data", {})
    return [(mime, _text(data[mime])) for mime in TEXT_MIMES if mime in data]


def _text(value) -> str:
    if isinstance(value, list):
        return "".join(value)
    return value if isinstance(value, str) else json.dumps(value)


def findings(nb: dict, name: str, stderr_allowed: dict | None = None) -> list[str]:
    """What is wrong with the stored outputs of notebook `nb` (parsed JSON) called `name`: one line each."""
    allowed = STDERR_ALLOWED if stderr_allowed is None else stderr_allowed
    found = []
    for index, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            where = f"{name} cell {index}"
            if output.get("output_type") == "error":
                found.append(f"{where}: an error output ({output.get('ename')}: {str(output.get('evalue'))[:80]})")
            if (
                output.get("output_type") == "stream"
                and output.get("name") == "stderr"
                and (name, index) not in allowed
            ):
                found.append(f"{where}: stderr output {_text(output.get('text', ''))[:120]!r}")
            for kind, text in output_texts(output):
                if kind != "error" and (hit := TRACEBACK.search(text)):
                    found.append(f"{where} ({kind}): a traceback {text[hit.start() : hit.start() + 80]!r}")
                for hit in ABSOLUTE_PATH.finditer(text):
                    found.append(f"{where} ({kind}): an absolute path {text[hit.start() : hit.start() + 60]!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: lesson_id(p))
def test_stored_outputs_are_clean(path):
    problems = findings(json.loads(path.read_text(encoding="utf-8")), path.name)
    assert not problems, "re-execute the lesson after fixing its code (never edit outputs):\n" + "\n".join(problems)


def test_every_allowed_stderr_output_says_why_and_still_exists():
    for (name, index), why in STDERR_ALLOWED.items():
        assert len(why) > 20, f"{name} cell {index}: say why its stderr is acceptable"
        cells = json.loads((NOTEBOOKS[0].parent / name).read_text(encoding="utf-8"))["cells"]
        outputs = cells[index].get("outputs", [])
        assert any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in outputs), (name, index)


def _nb(*outputs) -> dict:
    return {"cells": [{"cell_type": "markdown", "source": "/home/x in prose is not an output"},
                      {"cell_type": "code", "source": "", "outputs": list(outputs)}]}  # fmt: skip


@pytest.mark.parametrize(
    "output, expected",
    [
        ({"output_type": "stream", "name": "stdout", "text": ["data in /home/alice/wiki.test.raw\n"]}, "absolute path"),
        ({"output_type": "stream", "name": "stdout", "text": "saved to /tmp/x.json"}, "absolute path"),
        ({"output_type": "stream", "name": "stdout", "text": "LABKIT_DATA_DIR=/work/shared/data"}, "absolute path"),
        ({"output_type": "stream", "name": "stdout", "text": "folder /root"}, "absolute path"),
        ({"output_type": "stream", "name": "stdout", "text": "C:\\Users\\me\\data"}, "absolute path"),
        ({"output_type": "execute_result", "data": {"text/plain": "PosixPath('/content/drive')"}}, "absolute path"),
        ({"output_type": "stream", "name": "stderr", "text": "UserWarning: beta\n"}, "stderr output"),
        ({"output_type": "stream", "name": "stderr", "text": "perplexity: 100%|##########|"}, "stderr output"),
        ({"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": []}, "an error output"),
        (
            {"output_type": "stream", "name": "stdout", "text": "Traceback (most recent call last):\n  File"},
            "traceback",
        ),
        ({"output_type": "stream", "name": "stdout", "text": 'x\n  File "lib.py", line 3, in f\n'}, "traceback"),
    ],
)
def test_the_scan_finds_each_kind_of_problem(output, expected):
    found = findings(_nb(output), "99_toy.ipynb", stderr_allowed={})
    assert found and all(line.startswith("99_toy.ipynb cell 1") for line in found) and expected in found[0]


@pytest.mark.parametrize(
    "text",
    [
        "see https://github.com/home/tmp/root and ../build/export/cpu",
        "ratio 1.72 (survey: 12.62 at 128 vs 5.68 at 2048)",
        "local copy of WikiText-2; Results go to the results folder",
        "<style>.output_html .gt { color: #04D } /* Generic.Traceback */</style>",
        "bits/weight 4.31 and 3:4 or 2:4, 7/10",
        "ValueError: sizes=[20, 10, 0] leaves rank(s) [2] without a layer",  # a refusal shown on purpose
    ],
)
def test_the_scan_leaves_ordinary_text_alone(text):
    output = {"output_type": "execute_result", "data": {"text/plain": text, "text/html": text}}
    assert findings(_nb(output, {"output_type": "stream", "name": "stdout", "text": text}), "99_x.ipynb") == []


def test_an_allowed_stderr_output_is_not_reported():
    nb = _nb({"output_type": "stream", "name": "stderr", "text": "a known notice"})
    assert findings(nb, "99_toy.ipynb", stderr_allowed={("99_toy.ipynb", 1): "a stated reason"}) == []


ROW = re.compile(r"^(\d\d_[a-z0-9_]+)\s{2,}\S.*$", re.MULTILINE)  # a line of labkit.results.table: lesson, then the row


def table_rows(nb: dict) -> list[tuple[str, str]]:
    """(lesson, row with its spacing collapsed) for every results-table line in the stored outputs of `nb`."""
    rows = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            for kind, text in output_texts(output):
                if kind in ("stream stdout", "text/plain"):
                    rows += [(hit.group(1), " ".join(hit.group(0).split())) for hit in ROW.finditer(text)]
    return rows


def test_a_row_shown_by_another_lesson_is_the_row_its_own_lesson_recorded():
    # Lessons 04 and 12 (and others) print rows recorded by earlier lessons; executed at another time, the
    # baseline's speed or memory could differ from what lesson 00 shows (issue 16). Re-execute the lessons in
    # one sequence (python -m labkit.course --in-place) so every copy of a row is the same measurement.
    own = {path.name.removesuffix(".ipynb"): json.loads(path.read_text(encoding="utf-8")) for path in NOTEBOOKS}
    recorded = {name: {row for lesson, row in table_rows(nb) if lesson == name} for name, nb in own.items()}
    stale = [
        f"{name} shows: {row}"
        for name, nb in own.items()
        for lesson, row in table_rows(nb)
        if lesson != name and lesson in recorded and row not in recorded[lesson]
    ]
    assert not stale, "rows that differ from their own lesson's output:\n" + "\n".join(stale)


def test_the_row_comparison_finds_a_changed_row():
    line = "00_baseline  float32 baseline  -  134.5  513.1 MiB  533.2 MiB  22.6  36.47  a1b2c3"
    nb = _nb({"output_type": "stream", "name": "stdout", "text": line + "\n"})
    assert table_rows(nb) == [("00_baseline", " ".join(line.split()))]
    assert table_rows(_nb({"output_type": "stream", "name": "stdout", "text": "00_baseline.ipynb: done\n"})) == []
