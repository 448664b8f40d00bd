"""Open the built book in headless Chromium, as a reader would, offline from file:// URLs.

Every page of the table of contents (and index.html, which redirects to the introduction) is
loaded; the test fails on a missing page, a broken internal link (file or #anchor), an image
that does not load (a missing figure), a console error or uncaught exception, any request
that leaves the site (the book must work without a network: all http(s) requests are blocked
so the result is the same on a machine with internet), or math that MathJax did not typeset.
It saves a screenshot of the front page as build/book_front_page.png.

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so no websocket client,
driver or browser download is needed: only Debian's `chromium` package, which .ci/run
installs. As root it needs --no-sandbox. Instead of --virtual-time-budget (the command-line
way to let a redirect settle), the test waits for the redirect's target to load.
"""

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bookbuild import ROOT, build, lessons_in_book, require_npm_or_cached_mathjax, toc_files

SCREENSHOT = ROOT / "build" / "book_front_page.png"


def chromium_executable():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs Debian's `chromium` package)")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


class Chromium:
    """A headless Chromium and a minimal DevTools-protocol client over --remote-debugging-pipe."""

    def __init__(self, executable, profile_dir):
        # Our ends: write commands to `to_browser`, read replies from `from_browser`. Chromium
        # reads fd 3 and writes fd 4; move our pipe ends above 10 first so dup2 cannot clobber them.
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        r_in, w_out = _dup_above(r_in, 10), _dup_above(w_out, 10)
        args = [
            executable,
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-extensions",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={profile_dir}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")

        def child_fds():
            os.dup2(r_in, 3)
            os.dup2(w_out, 4)

        # close_fds=False: Python's own descriptors are not inheritable (PEP 446); only 3 and 4 pass.
        self.proc = subprocess.Popen(
            args,
            close_fds=False,
            preexec_fn=child_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for fd in (r_in, w_out):
            os.close(fd)
        self.to_browser, self.from_browser = w_in, r_out
        self.buffer = b""
        self.next_id = 0
        self.events = []  # (sessionId, method, params) not yet consumed

    def close(self):
        with contextlib.suppress(Exception):  # the browser may already be gone
            self.send("Browser.close", timeout=10)
        for fd in (self.to_browser, self.from_browser):
            os.close(fd)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _read_message(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, params=None, session=None, timeout=30):
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append((reply.get("sessionId"), reply["method"], reply.get("params", {})))

    def wait_event(self, method, session, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, (s, m, params) in enumerate(self.events):
                if s == session and m == method:
                    del self.events[i]
                    return params
            reply = self._read_message(deadline)
            if "method" in reply:
                self.events.append((reply.get("sessionId"), reply["method"], reply.get("params", {})))

    def drain(self, session):
        """Read whatever has arrived, then return and forget this session's events."""
        while select.select([self.from_browser], [], [], 0.2)[0] or b"\0" in self.buffer:
            reply = self._read_message(time.monotonic() + 5)
            if "method" in reply:
                self.events.append((reply.get("sessionId"), reply["method"], reply.get("params", {})))
        mine = [(m, p) for s, m, p in self.events if s == session]
        self.events = [e for e in self.events if e[0] != session]
        return mine


def _dup_above(fd, minimum):
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)
    os.close(fd)
    return new


# What the page reports once it has loaded, MathJax has typeset and images have settled.
PAGE_REPORT = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const settle = img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; });
  await Promise.race([Promise.all([...document.images].map(settle)), new Promise(r => setTimeout(r, 10000))]);
  const math = [...document.querySelectorAll('.math')];
  return JSON.stringify({
    url: location.href,
    title: document.title,
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    math: math.length,
    untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
    mjx: document.querySelectorAll('mjx-container').length,
    merror: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80)),
    outputImages: document.querySelectorAll('.cell_output img').length,
    mathjaxLoaded: !!(window.MathJax && MathJax.version),
  });
})()"""


def problems_in(events):
    """Console errors, uncaught exceptions and failed requests among a page's protocol events."""
    found, urls = [], {p["requestId"]: p["request"]["url"] for m, p in events if m == "Network.requestWillBeSent"}
    for method, p in events:
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            found.append(f"uncaught exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            found.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]
            found.append(f"console error ({e['source']}): {e['text']} {e.get('url', '')}".strip())
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            why = " ".join(filter(None, [p.get("errorText"), p.get("blockedReason")]))
            found.append(f"request failed ({p.get('type')}, {why}): {urls.get(p['requestId'], '?')}")
        elif method == "Network.requestWillBeSent" and not p["request"]["url"].startswith(
            ("file:", "data:", "blob:", "about:")
        ):
            found.append(f"request leaves the site: {p['request']['url']}")
    return found


@cache
def anchors_of(path):
    return set(re.findall(r'\bid="([^"]+)"', Path(path).read_text(errors="replace")))


def broken_links(links, site):
    """Links into the site (file:// URLs) whose file, or #anchor in an HTML file, does not exist."""
    broken = []
    for href in links:
        parts = urlsplit(href)
        if parts.scheme in ("http", "https", "mailto", "javascript", "tel"):
            continue  # the outside world: not checked offline
        if parts.scheme != "file":
            broken.append(f"{href} (unexpected scheme)")
            continue
        target = Path(unquote(parts.path))
        if site not in target.parents and target != site:
            broken.append(f"{href} (outside the site)")
        elif not target.exists():
            broken.append(f"{href} (no such file)")
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in anchors_of(str(target)):
            broken.append(f"{href} (no such anchor)")
    return broken


@pytest.fixture(scope="module")
def site():
    executable = chromium_executable()
    require_npm_or_cached_mathjax()
    built = build()
    if not built.ok:
        pytest.fail("the book did not build (tests/test_book.py shows why):\n" + built.log[-3000:])
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(executable, profile)
        try:
            yield built.html, browser
        finally:
            browser.close()


def open_page(browser, url, expect_url=None):
    """Load url in a fresh tab; return (report, problems). expect_url: where a redirect must end."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]}, session=session
        )
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        nav = browser.send("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            return None, [f"cannot open {url}: {nav['errorText']}"]
        browser.wait_event("Page.loadEventFired", session)
        if expect_url:  # a redirect page: wait until its target has loaded
            deadline = time.monotonic() + 15
            while True:
                try:
                    href = browser.send(
                        "Runtime.evaluate", {"expression": "location.href + ' ' + document.readyState"}, session=session
                    )["result"]["value"]
                except RuntimeError as error:  # the redirect replaced the page while we asked: ask again
                    if not any(m in str(error) for m in ("navigated or closed", "context was destroyed")):
                        raise
                    href = "(navigating)"
                if href == f"{expect_url} complete":
                    break
                if time.monotonic() > deadline:
                    return None, [f"{url} did not redirect to {expect_url} (at {href})"]
                time.sleep(0.1)
        result = browser.send(
            "Runtime.evaluate",
            {"expression": PAGE_REPORT, "awaitPromise": True, "returnByValue": True},
            session=session,
            timeout=60,
        )
        if "exceptionDetails" in result:
            return None, [f"page report failed: {result['exceptionDetails']}"]
        report = json.loads(result["result"]["value"])
        if url.endswith("/index.html"):
            png = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(png))
        return report, problems_in(browser.drain(session))
    finally:
        browser.send("Target.closeTarget", {"targetId": target})


def test_every_page_opens_offline_without_errors(site):
    html, browser = site
    pages = {"index": (html / "index.html").as_uri()}
    missing = []
    for f in toc_files():
        page = html / f"{f}.html"
        if page.exists():
            pages[f] = page.as_uri()
        else:
            missing.append(f"{f}.html")
    assert not missing, f"pages missing from the built site: {missing}"
    assert {f"notebooks/{p.stem}" for p in lessons_in_book()} <= set(pages)

    failures, reports = [], {}
    for name, url in pages.items():
        expect = (html / f"{toc_files()[0]}.html").as_uri() if name == "index" else None
        report, problems = open_page(browser, url, expect_url=expect)
        reports[name] = report
        failures += [f"{name}: {p}" for p in problems]
        if report is None:
            continue
        failures += [f"{name}: image did not load: {i['src']}" for i in report["images"] if not i["ok"]]
        failures += [f"{name}: broken link {b}" for b in broken_links(report["links"], html)]
        if report["math"]:
            if not report["mathjaxLoaded"]:
                failures.append(f"{name}: the page has math but MathJax did not load")
            failures += [f"{name}: math not typeset: {t}" for t in report["untypeset"]]
            failures += [f"{name}: MathJax error: {t}" for t in report["merror"]]
    assert not failures, "\n".join(failures)

    # the checks above were not vacuous
    assert reports["index"]["url"].endswith(f"/{toc_files()[0]}.html")
    assert SCREENSHOT.stat().st_size > 10_000, "the front page's screenshot looks empty"
    assert reports["glossary"]["math"] > 0 and reports["glossary"]["mjx"] >= reports["glossary"]["math"]
    for p in lessons_in_book():
        report = reports[f"notebooks/{p.stem}"]
        n_figures = sum(
            1
            for c in json.loads(p.read_text())["cells"]
            if c["cell_type"] == "code"
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        )
        assert report["outputImages"] >= n_figures, (
            f"{p.stem}: {n_figures} stored figures, {report['outputImages']} shown"
        )
        assert any(l.endswith("/intro.html") for l in report["links"]), f"{p.stem}: no navigation back to the start"
