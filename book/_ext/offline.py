"""Make the built book readable offline: a local MathJax and a local "Open in Colab" badge.

MathJax. Sphinx loads MathJax from a CDN by default, so math would show as raw TeX on a
machine without internet. `_config.yml` sets `mathjax_path` to a path relative to the
output's `_static/` (as Sphinx's docs describe for a local copy), and this extension puts the
npm package `mathjax` there: it fetches the pinned release once with `npm pack` into a cache
folder, checks its sha512, and unpacks its `es5/` folder into `_build/html/_static/mathjax/`
when the build finishes. It is not placed in the book's source `_static/` folder: Jupyter
Book 1 would then add every one of its 69 .js files to every page.

Colab badge. Lessons start with Colab's badge image from colab.research.google.com, which
cannot load offline. In the book the image is replaced by a local copy (`_ext/colab-badge.svg`)
with the same link; the notebooks themselves are unchanged.

Duplicate scripts. Jupyter Book 1's sphinx-thebe adds its inline configuration script twice
to every page (`const THEBE_JS_URL = ...` declared twice: a SyntaxError in the console); each
page's scripts are de-duplicated here.

Configuration (optional, in `sphinx: config:`): `offline_mathjax_version`,
`offline_mathjax_sha512`, `offline_mathjax_cache` (default: $LABKIT_MATHJAX_CACHE, else
$XDG_CACHE_HOME/labkit/mathjax or ~/.cache/labkit/mathjax).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from docutils import nodes
from sphinx.errors import ExtensionError
from sphinx.transforms import SphinxTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)

MATHJAX_VERSION = "3.2.2"
# `npm view mathjax@3.2.2 dist.integrity` (the registry's own checksum of the tarball).
MATHJAX_SHA512 = "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
COLAB_BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = Path(__file__).with_name("colab-badge.svg")


def default_cache() -> Path:
    if os.environ.get("LABKIT_MATHJAX_CACHE"):
        return Path(os.environ["LABKIT_MATHJAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "labkit" / "mathjax"


def sha512_b64(path: Path) -> str:
    return base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def mathjax_tarball(version: str, sha512: str, cache: Path) -> Path:
    """The npm tarball of mathjax@version in `cache`, fetched with `npm pack` if missing.
    sha512: the registry's integrity value (base64); "" skips the check."""
    tgz = cache / f"mathjax-{version}.tgz"
    if tgz.exists():
        if sha512 and sha512_b64(tgz) != sha512:
            raise ExtensionError(
                f"{tgz} does not have the sha512 of mathjax@{version} ({sha512}); delete it to fetch it again"
            )
        return tgz
    npm = shutil.which("npm")
    if npm is None:
        raise ExtensionError(
            f"the book needs MathJax {version} for offline math, and `npm` is not installed to fetch it: "
            f"install Node.js/npm (Debian: apt-get install npm), or put the file that "
            f"`npm pack mathjax@{version}` writes at {tgz}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        logger.info(f"[offline] fetching mathjax@{version} from the npm registry into {cache}")
        done = subprocess.run(
            [npm, "pack", f"mathjax@{version}", "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        fetched = Path(tmp) / tgz.name
        if done.returncode != 0 or not fetched.exists():
            raise ExtensionError(
                f"`npm pack mathjax@{version}` failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-1000:]}"
            )
        if sha512 and sha512_b64(fetched) != sha512:
            raise ExtensionError(f"the mathjax@{version} that npm fetched does not have the pinned sha512 {sha512}")
        os.replace(fetched, tgz)
    return tgz


def mathjax_is_local(config) -> bool:
    return bool(config.mathjax_path) and "://" not in config.mathjax_path and not config.mathjax_path.startswith("//")


def fetch_mathjax(app) -> None:
    """builder-inited: fail early (before reading any page) if MathJax cannot be had."""
    if app.builder.format != "html" or not mathjax_is_local(app.config):
        return
    if not app.config.mathjax_path.startswith("mathjax/"):
        raise ExtensionError(
            f"mathjax_path={app.config.mathjax_path!r}: a local MathJax lives under "
            "'mathjax/' in _static (e.g. 'mathjax/tex-chtml.js'), or use a URL"
        )
    version = app.config.offline_mathjax_version
    sha512 = app.config.offline_mathjax_sha512 or (MATHJAX_SHA512 if version == MATHJAX_VERSION else "")
    app.offline_mathjax_tgz = mathjax_tarball(
        version, sha512, Path(app.config.offline_mathjax_cache or default_cache())
    )


def install_mathjax(app, exception) -> None:
    """build-finished: unpack the package's es5/ folder into _static/mathjax/ of the output."""
    tgz = getattr(app, "offline_mathjax_tgz", None)
    if exception is not None or tgz is None:
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(tgz) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile() and (m.name.startswith("package/es5/") or m.name == "package/LICENSE")
        ]
        for m in members:  # package/es5/tex-chtml.js -> mathjax/tex-chtml.js
            m.name = m.name.removeprefix("package/").removeprefix("es5/")
            if m.name.startswith("/") or ".." in m.name.split("/"):
                raise ExtensionError(f"{tgz}: unexpected member {m.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(target, members=members, filter="data")
        else:
            tar.extractall(target, members=members)
    script = target / app.config.mathjax_path.removeprefix("mathjax/")
    if not script.is_file():
        raise ExtensionError(
            f"mathjax_path={app.config.mathjax_path!r} is not a file of mathjax@"
            f"{app.config.offline_mathjax_version} (looked for {script})"
        )
    logger.info(f"[offline] MathJax {app.config.offline_mathjax_version} copied to {target}")


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """html-page-context (late): drop repeated <script> entries (same src and same inline body)."""
    scripts, seen = [], set()
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))  # not priority
        if key not in seen:
            seen.add(key)
            scripts.append(js)
    context["script_files"] = scripts


class LocalColabBadge(SphinxTransform):
    """Point Colab's badge image at the local copy (read time, before images are collected)."""

    default_priority = 400

    def apply(self, **kwargs) -> None:
        for image in self.document.findall(nodes.image):
            if image.get("uri") == COLAB_BADGE_URL:
                image["uri"] = "/_ext/" + LOCAL_BADGE.name  # '/': relative to the book's root


def setup(app):
    app.add_config_value("offline_mathjax_version", MATHJAX_VERSION, "html")
    app.add_config_value("offline_mathjax_sha512", "", "html")  # "": the pinned one for MATHJAX_VERSION
    app.add_config_value("offline_mathjax_cache", "", "html")
    app.connect("builder-inited", fetch_mathjax)
    app.connect("build-finished", install_mathjax)
    app.connect("html-page-context", dedupe_scripts, priority=900)
    app.add_transform(LocalColabBadge)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
