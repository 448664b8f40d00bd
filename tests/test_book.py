"""The Jupyter Book: its table of contents matches the lessons, and it builds offline from the
stored notebook outputs (no execution), with every lesson page, a local MathJax, the glossary
and the bibliography. tests/test_browser.py opens the same build in Chromium."""

import json
import re

import pytest
import yaml
from bookbuild import ROOT, lesson_notebooks, lessons_in_book, require_npm_or_cached_mathjax, toc_files
from bookbuild import build as _build

BOOK = ROOT / "book"


def build():
    require_npm_or_cached_mathjax()
    return _build()


SOURCE_SUFFIXES = (".md", ".ipynb", ".rst")


def test_every_lesson_is_in_the_toc_once_under_its_track():
    listed = toc_files()
    lessons = lesson_notebooks()
    assert lessons, "no notebooks/NN_*.ipynb found"
    for p in lessons:
        assert listed.count(f"notebooks/{p.stem}") == 1, (p.stem, listed)
    text = (BOOK / "_toc.yml").read_text()
    captions = [part["caption"] for part in yaml.safe_load(text)["parts"]]
    assert captions[0] == "Foundations" and captions[-1] == "Reference", captions


def test_every_toc_entry_exists():
    files = toc_files()
    assert len(files) == len(set(files)), f"the toc lists a page twice: {files}"
    missing = [f for f in files if not any((BOOK / f).with_suffix(s).exists() for s in SOURCE_SUFFIXES)]
    assert not missing, f"the toc lists pages that do not exist (Jupyter Book 1 would fail): {missing}"


def test_a_lesson_without_a_track_is_an_error(tmp_path):
    import sys

    sys.path.insert(0, str(BOOK))
    try:
        import toc
    finally:
        sys.path.pop(0)
    (tmp_path / "00_baseline.ipynb").write_text("{}")
    (tmp_path / "13_bonus.ipynb").write_text("{}")
    with pytest.raises(ValueError, match=r"13_bonus.*belong to no track"):
        toc.toc_text(tmp_path)


def test_bibliography_has_every_cited_paper():
    bib = (BOOK / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, flags=re.M))
    wanted = {
        "frantar2023gptq",
        "frantar2023sparsegpt",
        "sun2024wanda",
        "an2024flap",
        "ma2023llmpruner",
        "dettmers2022llmint8",
        "xiao2023smoothquant",
        "dettmers2023qlora",
        "hinton2015kd",
        "agarwal2024gkd",
        "wang2025svdllm",
        "yuan2023asvd",
        "kwon2023vllm",
        "shoeybi2019megatron",
        "zhu2024survey",
        "chavan2024faster",
    }
    assert wanted <= keys, wanted - keys
    cited = set()
    for page in BOOK.glob("*.md"):
        cited |= set(re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text()))
    cited = {k.strip() for c in cited for k in c.split(",")}
    assert cited <= keys, f"cited but not in references.bib: {cited - keys}"
    # every entry appears in exactly one track section of bibliography.md
    sections = re.findall(r':filter: keywords % "(\w+)"', (BOOK / "bibliography.md").read_text())
    for key, kw in re.findall(r"^@\w+\{([^,]+),.*?keywords\s*=\s*\{(\w+)\}", bib, flags=re.M | re.S):
        assert kw in sections, f"{key}: keywords={{{kw}}} has no section in bibliography.md"


def test_book_builds_offline():
    built = build()
    assert built.ok, built.log
    html = built.html
    assert (html / "index.html").exists()
    for p in lessons_in_book():
        page = (html / "notebooks" / f"{p.stem}.html").read_text()
        # stored outputs were rendered (no execution at build time)
        n_images = sum(
            1
            for c in json.loads(p.read_text())["cells"]
            if c["cell_type"] == "code"
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        )
        assert page.count('class="cell_output') > 0, f"{p.stem}: no cell outputs rendered"
        assert page.count("<img") >= n_images, f"{p.stem}: {n_images} stored figures, fewer <img> on the page"
        assert "colab.research.google.com/assets/" not in page, f"{p.stem}: the remote Colab badge (offline: broken)"
    for name in ("glossary", "bibliography"):
        assert (html / f"{name}.html").exists()
    assert 'id="term-KV-cache"' in (html / "glossary.html").read_text()


def test_math_uses_the_local_mathjax():
    built = build()
    assert built.ok, built.log
    html = built.html
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    path = config["sphinx"]["config"]["mathjax_path"]
    assert "://" not in path
    assert (html / "_static" / path).is_file(), f"{path} is not in the built site's _static/"
    assert (html / "_static" / "mathjax" / "input" / "tex" / "extensions").is_dir()  # autoloaded TeX packages
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert "cdn.jsdelivr.net" not in text and "mathjax@3/" not in text, f"{page.name} loads MathJax from a CDN"
    glossary = (html / "glossary.html").read_text()
    assert re.search(r'<script defer="defer" src="_static/mathjax/[^"]+\.js', glossary), "glossary: no local MathJax"
    # not injected through the book's _static/ (Jupyter Book 1 adds every .js there to every page)
    assert not (BOOK / "_static" / "mathjax").exists()
    assert glossary.count("_static/mathjax/") == 1


def test_launch_buttons_point_at_the_repository_notebooks():
    built = build()
    assert built.ok, built.log
    for p in lessons_in_book():
        page = (built.html / "notebooks" / f"{p.stem}.html").read_text()
        links = set(re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', page))
        assert links, f"{p.stem}: no Colab link"
        for link in links:
            assert link.endswith(f"/blob/main/notebooks/{p.stem}.ipynb"), link
