"""Lesson ids: two digits, and a lowercase letter for a lesson inserted after another without renumbering
('05b' follows '05' and precedes '06'). labkit.course holds the one rule (lesson_id, is_lesson_id, lessons);
these tests prove it on a folder of fake notebooks, and that runtime, results and the book follow it."""

from pathlib import Path

import pytest
from bookbuild import _toc_module
from helpers import row

from labkit import course, results, runtime

ROOT = Path(__file__).resolve().parent.parent
FAKE = ["06_z", "05b_y", "05_x", "5_bad", "05B_bad", "notes", "05b", "123_x", "05bc_x", "05_", "x05_y"]


@pytest.fixture
def fake_notebooks(tmp_path):
    for name in FAKE:
        (tmp_path / f"{name}.ipynb").write_text("{}")
    (tmp_path / "05c_not_a_notebook.py").write_text("")
    return tmp_path


def test_lessons_are_found_and_ordered(fake_notebooks):
    found = course.lessons(fake_notebooks)
    assert [p.name for p in found] == ["05_x.ipynb", "05b_y.ipynb", "06_z.ipynb"]
    assert [course.lesson_id(p) for p in found] == ["05", "05b", "06"]


def test_selecting_by_id_is_exact_and_by_prefix_is_a_prefix(fake_notebooks):
    assert [p.name for p in course.lessons(fake_notebooks, select=["05"])] == ["05_x.ipynb"]  # not 05b
    assert [p.name for p in course.lessons(fake_notebooks, select=["05b"])] == ["05b_y.ipynb"]
    assert [p.name for p in course.lessons(fake_notebooks, select=["06_z", "05b"])] == ["05b_y.ipynb", "06_z.ipynb"]
    assert [p.name for p in course.lessons(fake_notebooks, select=["0"])] == ["05_x.ipynb", "05b_y.ipynb", "06_z.ipynb"]
    with pytest.raises(SystemExit, match="No lesson matches"):
        course.lessons(fake_notebooks, select=["05c"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("05", "05"),
        ("05b", "05b"),
        ("05_gptq", "05"),
        ("05b_awq_and_qlora", "05b"),
        ("05b_awq_and_qlora.ipynb", "05b"),
        (Path("notebooks/05b_awq_and_qlora.ipynb"), "05b"),
        ("12_capstone.ipynb", "12"),
    ],
)
def test_lesson_id(name, expected):
    assert course.lesson_id(name) == expected


@pytest.mark.parametrize("name", ["5_bad", "05B_bad.ipynb", "05bc_x", "123_x", "05_", "notes.ipynb", "5", "05B", ""])
def test_lesson_id_refuses_what_is_no_lesson(name):
    with pytest.raises(ValueError, match="not a lesson's name"):
        course.lesson_id(name)


def test_ids_sort_in_course_order():
    ids = ["06", "05b", "12", "00", "05", "10"]
    assert sorted(ids) == ["00", "05", "05b", "06", "10", "12"]
    assert all(course.is_lesson_id(i) for i in ids)
    assert not any(course.is_lesson_id(i) for i in ["5", "05B", "005", "05bc", "05_gptq", "٠٥"])


def test_the_course_lessons_have_unique_ids_in_order():
    ids = [course.lesson_id(p) for p in course.lessons()]
    assert ids and ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert list(runtime.LESSONS) == ids


# --- labkit.runtime --------------------------------------------------------------------------------------


def test_runtime_keys_take_lettered_ids(monkeypatch):
    monkeypatch.setitem(runtime.LESSONS, "07b", runtime.Need("A100-40", "estimate", "a fake inserted lesson"))
    for given in ("07b", "07b_fake_title", "07b_fake_title.ipynb"):
        assert runtime.lesson_key(given) == "07b"
    assert runtime.lesson_key(7) == runtime.lesson_key("7") == runtime.lesson_key("07_distillation") == "07"
    for bad in ("05c", "07c", "7b", "07B", "07bb"):
        with pytest.raises(ValueError, match=f"lesson={bad!r}: allowed are"):
            runtime.lesson_key(bad)


def test_runtime_rejects_an_unknown_lettered_lesson():
    assert "05c" not in runtime.LESSONS
    with pytest.raises(ValueError, match="lesson='05c': allowed are"):
        runtime.lesson_key("05c")
    with pytest.raises(ValueError, match="lesson='05c_x': allowed are"):
        runtime.lesson_key("05c_x")


# --- labkit.results -----------------------------------------------------------------------------------------


def test_reference_prefixes_keep_lessons_apart():
    assert results._prefixes("05", "05/gptq-w4/perplexity")
    assert not results._prefixes("05", "05b/awq-w4-grouped/perplexity")
    assert results._prefixes("05b", "05b/awq-w4-grouped/perplexity")
    assert not results._prefixes("05b", "05/gptq-w4/perplexity")
    assert results._prefixes("00", "00_baseline/perplexity")
    assert results._prefixes("0", "05b/awq-w4-grouped/perplexity")  # not an id: a plain prefix, as before
    assert results._prefixes("05b/awq", "05b/awq-w4-grouped/perplexity")


def test_protocols_name_lettered_lessons():
    rows = [row(), row(lesson="05b_awq_and_qlora", method="AWQ"), row(lesson="05_gptq", method="GPTQ")]
    assert results.protocols(rows).endswith("(lessons 00, 05, 05b)")
    assert results.protocols([row(lesson="not a lesson")]).endswith("(lessons not a lesson)")


# --- the book ------------------------------------------------------------------------------------------------


def test_the_book_places_an_inserted_lesson_after_its_predecessor(tmp_path):
    for name in ("04_a", "05_x", "05b_y", "06_z"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    toc = _toc_module()
    assert toc.lessons(tmp_path) == {"04": "04_a", "05": "05_x", "05b": "05b_y", "06": "06_z"}
    assert dict(toc.parts(tmp_path))["Quantization"] == [f"notebooks/{n}" for n in ("04_a", "05_x", "05b_y", "06_z")]
    (tmp_path / "05c_stray.ipynb").write_text("{}")
    with pytest.raises(ValueError, match=r"05c_stray.*belong to no track"):
        toc.parts(tmp_path)


def test_the_books_chapters_follow_the_course_order():
    pages = [
        page for _, pages in _toc_module().parts(ROOT / "notebooks") for page in pages if page.startswith("notebooks/")
    ]
    assert pages == [f"notebooks/{p.stem}" for p in course.lessons()]
