"""The documentation: the generated configuration reference, the MkDocs site and what a reader's
browser makes of it.

The site is built once per module with ``mkdocs build --strict`` (broken links, missing
anchors, missing pages or snippets fail it) into a temporary folder, then served on 127.0.0.1
and opened in a real headless Chromium (Debian's ``chromium``, installed by .ci/run) through
Playwright, as tests/test_report.py opens the audit report.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "docs" / "hooks" / "config_reference.py"
# Words that mean something only inside the project: an issue number, a seed paper's number.
INTERNAL_WORDS = re.compile(r"\bissues? #?\d+|\bseed 00\d\b", re.IGNORECASE)


def _config_reference() -> ModuleType:
    """The MkDocs hook that generates the configuration reference, imported from its file."""
    name = "fedsynth_docs_config_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_config_key_has_a_description() -> None:
    from fedsynth.runs.config import RunConfig

    rows = _config_reference().config_rows()
    assert {row.key for row in rows} == set(RunConfig().to_run_config()), "the reference lists every key"
    missing = [row.key for row in rows if not row.description.strip()]
    assert not missing, f"config keys without Field(description=...): {', '.join(missing)}"


def test_the_reference_shows_each_key_as_users_type_it() -> None:
    rows = {row.key: row for row in _config_reference().config_rows()}
    steps = rows["train.local-steps"]
    assert (steps.type, steps.default) == ("int, >= 1", "`50`")
    assert rows["dp.on-budget-exhausted"].type == "one of `continue`, `stop`"


def test_user_facing_text_has_no_project_internal_words() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found = [
        f"{p.relative_to(REPO)}: {m.group(0)!r}"
        for p in pages
        for m in INTERNAL_WORDS.finditer(p.read_text())
    ]
    assert not found, found


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``mkdocs build --strict`` writes it."""
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"mkdocs build --strict: {time.monotonic() - started:.1f} s")
    return out


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for page in [
        "index.html",
        "getting-started/index.html",
        "data/index.html",
        "training/index.html",
        "privacy/index.html",
        "audit/index.html",
        "deployment/index.html",
        "run-directory/index.html",
        "configuration/index.html",
        "architecture/index.html",
        "adding-a-family/index.html",
        "benchmarks/index.html",
        "benchmarks/performance/index.html",
        "troubleshooting/index.html",
        "api/index.html",
    ]:
        assert (site / page).is_file(), page
    reference = (site / "configuration" / "index.html").read_text()
    for row in _config_reference().config_rows():
        assert f"<code>{row.key}</code>" in reference, row.key
    assert "RunConfig" in (site / "api" / "index.html").read_text(), "the API page shows the docstrings"
    # one source per figure: the benchmark pages carry the results files' own text
    results = (REPO / "benchmarks" / "results" / "full" / "dp_overhead.md").read_text()
    ratio = re.search(r"Ratio of medians: [0-9.]+", results)
    assert ratio and ratio.group(0) in (site / "benchmarks" / "performance" / "index.html").read_text()


def test_the_built_pages_load_nothing_from_another_host(site: Path) -> None:
    loads = re.compile(
        r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=\"(https?:)?//", re.IGNORECASE
    )
    offending = [str(p.relative_to(site)) for p in site.rglob("*.html") if loads.search(p.read_text())]
    assert not offending, f"pages that load from another host: {offending}"
    assert "fonts.googleapis.com" not in "".join(p.read_text() for p in site.rglob("*.html"))


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on a free port of 127.0.0.1, as `mkdocs serve` or a web server shows it."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("page", ["", "configuration/", "benchmarks/quality/", "api/"])
def test_pages_open_in_chromium_without_errors_or_external_requests(
    served: str, page: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        view = browser.new_page(viewport={"width": 1200, "height": 900})
        view.on("request", lambda r: requests.append(r.url))
        view.on(
            "console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        view.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        response = view.goto(served + page)
        view.wait_for_load_state("networkidle")
        assert response is not None and response.ok, page
        seen = view.evaluate("""() => ({
            title: document.title,
            headings: [...document.querySelectorAll('article h1')].map(h => h.innerText),
            images: [...document.querySelectorAll('article img')].map(i => i.complete && i.naturalWidth > 0),
            search: !!document.querySelector('input[data-md-component="search-query"]'),
        })""")
        if page == "":
            view.keyboard.press("s")  # the search shortcut; its index loads from this site, nowhere else
            view.locator('input[data-md-component="search-query"]').press_sequentially("privacy", delay=20)
            view.wait_for_selector(".md-search-result__item", timeout=15_000)
        view.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert not errors, errors
    external = [url for url in requests if not url.startswith((served, "data:", "blob:"))]
    assert not external, f"requests to other hosts: {external}"
    assert seen["title"].endswith("fedsynth") and seen["headings"] and seen["search"], seen
    assert all(seen["images"]), f"{page}: an image did not load"
    if page == "benchmarks/quality/":
        assert len(seen["images"]) >= 3, "the benchmark plots are on the page"
