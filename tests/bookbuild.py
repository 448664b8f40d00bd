"""Build the Jupyter Book once per test session; tests/test_book.py and tests/test_browser.py share it.

The book is copied (the book/notebooks symlink followed, any old _build left out) to
build/book/ and built there with warnings as errors, so a test run never touches
book/_build and always starts from a clean build. MathJax comes from the npm cache that
book/_ext/offline.py keeps (fetched on first use).
"""

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from labkit.course import lessons

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "book"


@dataclass
class Built:
    html: Path  # the built site (index.html, intro.html, notebooks/NN_*.html, ...)
    ok: bool
    log: str


def _toc_module():
    sys.path.insert(0, str(ROOT / "book"))
    try:
        import toc
    finally:
        sys.path.pop(0)
    return toc


def toc_files() -> list[str]:
    """Every page of the generated toc (root first): 'intro', 'notebooks/00_baseline', ... (book/toc.py)."""
    toc = yaml.safe_load(_toc_module().toc_text(ROOT / "notebooks"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return files


def lesson_notebooks() -> list[Path]:
    return lessons(ROOT / "notebooks")


def lessons_in_book() -> list[Path]:
    """The lesson notebooks the toc lists (test_book checks separately that it lists them all)."""
    listed = set(toc_files())
    return [p for p in lesson_notebooks() if f"notebooks/{p.stem}" in listed]


def require_npm_or_cached_mathjax():
    """The build fetches MathJax with npm once (book/_ext/offline.py). Without npm and without the
    cached tarball: skip on a developer's machine, fail in CI (.ci/run installs npm)."""
    import pytest

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import offline
    finally:
        sys.path.pop(0)
    cached = offline.default_cache() / f"mathjax-{offline.MATHJAX_VERSION}.tgz"
    if shutil.which("npm") or cached.exists():
        return
    message = f"the book needs npm once to fetch MathJax (Debian: apt-get install npm), or {cached}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def build() -> Built:
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.exists():
        return Built(WORK / "_build" / "html", False, "jupyter-book is not installed: pip install -e '.[book]'")
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.copytree(ROOT / "book", WORK, symlinks=False, ignore=shutil.ignore_patterns("_build", "__pycache__"))
    _toc_module().write_toc(WORK, WORK / "notebooks")  # the toc of the lessons present
    done = subprocess.run(
        [str(jb), "build", str(WORK), "--warningiserror", "--keep-going"], capture_output=True, text=True, timeout=900
    )
    return Built(WORK / "_build" / "html", done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:])
