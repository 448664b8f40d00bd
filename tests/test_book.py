"""The Jupyter Book builds offline from the stored notebook outputs, with every lesson page."""
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_book_lists_every_lesson():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    lessons = {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert lessons and lessons <= files


def test_book_builds_offline(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    assert jb.exists(), "jupyter-book is not installed: pip install -e '.[book]'"
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book", book, symlinks=False, ignore=shutil.ignore_patterns("_build"))
    done = subprocess.run([str(jb), "build", str(book), "--warningiserror", "--keep-going"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    html = book / "_build" / "html"
    for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        page = (html / "notebooks" / f"{p.stem}.html").read_text()
        assert "<img" in page or "output" in page  # stored outputs were rendered
    assert (html / "index.html").exists()
