"""The documentation works: tutorials run, the site builds offline.

- Every ``python`` code block of each page in ``docs/tutorials/`` runs, in order,
  in one namespace per page (so a tutorial cannot rot).
- ``mkdocs build --strict`` succeeds, and the built site loads nothing from the
  network: no ``src``/``href`` attribute or CSS ``url()`` points off-site, and the
  theme's web fonts are off.
- The Markdown sources hold no control characters (a ``\\a`` of ``\\approx`` written
  through a non-raw Python string becomes a BEL byte), every ``$$`` display block is a
  paragraph of its own, and no parenthesis follows another.
- The built HTML has no ``$`` in its prose: every formula was recognised as math.
- Every built page, rendered in headless Chromium (``tests/browser``, installed by
  ``npm ci --prefix tests/browser``), shows no KaTeX error, no ``$`` outside code and
  math, no console error, no failed request and no broken image. A screenshot of each
  page goes to ``site-screenshots/`` (or ``$EFF_ATTN_SCREENSHOTS``). Without the
  browser the test skips, except under ``CI`` where it fails.
- The exact page's time/memory figure has no overlapping x tick labels.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _code_blocks(path: Path) -> list[str]:
    return CODE_BLOCK.findall(path.read_text())


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_code_runs(page, tmp_path, monkeypatch):
    blocks = _code_blocks(page)
    assert blocks, f"{page.name} has no python code blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__tutorial__"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as exc:  # report which block failed
            raise AssertionError(f"{page.name}, code block {number} failed: {exc!r}\n{block}") from exc


needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="the docs extra (mkdocs) is not installed")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site


EXTERNAL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", re.I)
EXTERNAL_CSS = re.compile(r"""url\(\s*["']?(?:https?:)?//""", re.I)


@needs_mkdocs
def test_built_site_loads_nothing_from_the_network(built_site):
    offenders = []
    for path in built_site.rglob("*"):
        if path.suffix == ".html":
            text = path.read_text(errors="replace")
            offenders += [f"{path.relative_to(built_site)}: {m.group(0)}" for m in EXTERNAL_ATTR.finditer(text)]
        elif path.suffix == ".css":
            text = path.read_text(errors="replace")
            offenders += [f"{path.relative_to(built_site)}: {m.group(0)}" for m in EXTERNAL_CSS.finditer(text)]
    assert not offenders, "external URLs in the built site:\n" + "\n".join(offenders[:20])
    index = (built_site / "index.html").read_text()
    assert "fonts.googleapis" not in index and "assets/katex/katex.min.js" in index


@needs_mkdocs
def test_every_method_has_a_docs_page(built_site):
    from eff_attn import registry

    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    text = " ".join((ROOT / "docs" / "methods" / f"{p}.md").read_text() for p in pages)
    for name in registry.method_names(builtin_only=True):
        folder = registry.METHOD_MODULES[name].split(":")[0].split(".")[-1]
        assert folder in pages or f"`{name}`" in text, f"method {name} has no docs page"



# --- the Markdown sources ---------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_docs_sources_hold_no_control_characters():
    found = [f"{_rel(page)}:{number}: {line.strip()!r}"
             for page in PAGES for number, line in enumerate(page.read_text().splitlines(), 1)
             if CONTROL.search(line)]
    assert not found, ("control characters in the docs (\\a, \\b, \\f, \\v of a LaTeX macro written through a "
                       "non-raw Python string?):\n" + "\n".join(found))


def _string_literals(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_scripts_write_no_control_characters():
    """A script that writes docs text must not hold a string whose escapes made control bytes."""
    files = sorted((ROOT / "scripts").rglob("*.py")) + sorted((ROOT / "eff_attn" / "bench").rglob("*.py"))
    found = [f"{_rel(path)}:{line}: {value[:60]!r}" for path in files for line, value in _string_literals(path)
             if CONTROL.search(value.replace("\r", ""))]
    assert not found, "string literals with control characters (use a raw string r'...'):\n" + "\n".join(found)


FENCE = re.compile(r"^ *(```|~~~).*?^ *\1", re.S | re.M)


def _prose(text: str) -> str:
    """``text`` with code fences, inline code and link targets blanked, line numbers kept."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    text = FENCE.sub(blank, text)
    text = re.sub(r"`[^`\n]*`", blank, text)
    return re.sub(r"\]\([^)\s]*\)", blank, text)


def test_display_math_is_a_paragraph_of_its_own():
    """Python-Markdown sees a ``$$`` block only with a blank line before and after it."""
    found = []
    for page in PAGES:
        lines = _prose(page.read_text()).split("\n")
        number = 0
        while number < len(lines):
            line = lines[number].strip()
            if line.startswith("$$"):
                end = number
                if not (line.endswith("$$") and len(line) > 2):
                    end = next((j for j in range(number + 1, len(lines)) if lines[j].strip().endswith("$$")), number)
                before = lines[number - 1].strip() if number else ""
                after = lines[end + 1].strip() if end + 1 < len(lines) else ""
                if before or after:
                    found.append(f"{_rel(page)}:{number + 1}")
                number = end
            number += 1
    assert not found, "$$ blocks without a blank line before and after:\n" + "\n".join(found)


LIST_ITEM = re.compile(r"^ {0,3}(\d+\.|[-*+]) ")


def test_list_items_after_a_paragraph_start_a_new_item():
    """An item whose text goes on after a blank line needs a blank line before the next item,
    or Python-Markdown runs the next ``3. ...`` into the paragraph as plain text."""
    found = []
    for page in PAGES:
        lines = _prose(page.read_text()).split("\n")
        in_item, blank_since = False, False
        for number, line in enumerate(lines):
            if LIST_ITEM.match(line):
                if in_item and blank_since and lines[number - 1].startswith(" ") and lines[number - 1].strip():
                    found.append(f"{_rel(page)}:{number + 1}: {line[:60]!r}")
                in_item, blank_since = True, False
            elif not line.strip():
                blank_since = True
            elif not line.startswith(" "):
                in_item = False
    assert not found, "list items run into the paragraph before them (add a blank line):\n" + "\n".join(found)


def test_no_parenthesis_follows_another():
    """``text (a) (b)``: usually one aside pasted next to an older copy of itself."""
    found = []
    for page in PAGES:
        text = _prose(page.read_text())
        text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", lambda m: re.sub(r"[^\n]", "x", m.group(0)), text, flags=re.S)
        for match in re.finditer(r"\)[ \t]*\n?[ \t]*\(", text):
            number = text.count("\n", 0, match.start()) + 1
            found.append(f"{_rel(page)}:{number}: {text[match.start() - 40:match.end() + 20]!r}")
    assert not found, "one parenthesis right after another:\n" + "\n".join(found)


# --- the built HTML -------------------------------------------------------------------

class _ProseDollars(HTMLParser):
    """Collects the ``$`` signs of an HTML page's text outside code and arithmatex math."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    SKIP = {"code", "pre", "script", "style", "textarea", "kbd", "samp"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open_tags: list[tuple[str, bool]] = []      # (tag, inside code or math)
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        inside = bool(self.open_tags and self.open_tags[-1][1])
        self.open_tags.append((tag, inside or tag in self.SKIP or "arithmatex" in classes))

    def handle_endtag(self, tag):
        for depth in range(len(self.open_tags) - 1, -1, -1):
            if self.open_tags[depth][0] == tag:
                del self.open_tags[depth:]
                return

    def handle_data(self, data):
        if self.open_tags and self.open_tags[-1][1]:
            return
        for match in re.finditer(r"\$", data):
            context = data[max(0, match.start() - 40):match.end() + 40]
            self.found.append(f"line {self.getpos()[0]}: {' '.join(context.split())!r}")


def prose_dollars(html: str) -> list[str]:
    parser = _ProseDollars()
    parser.feed(html)
    parser.close()
    return parser.found


def test_prose_dollar_finder_finds_only_prose():
    html = ('<p>costs $ <span class="arithmatex">\\(x^2\\)</span> <code>$HOME</code></p>'
            '<pre><code>echo $PATH</code></pre><div class="arithmatex">\\[a\\]</div><p>and $$ y $$<br>$</p>')
    assert len(prose_dollars(html)) == 6          # costs $; and $$ y $$; $


@needs_mkdocs
def test_built_html_has_no_dollar_outside_math_and_code(built_site):
    found = {str(path.relative_to(built_site)): prose_dollars(path.read_text())
             for path in sorted(built_site.rglob("*.html"))}
    found = {page: hits for page, hits in found.items() if hits}
    assert not found, "a $ left in the prose (math Markdown did not recognise):\n" + "\n".join(
        f"{page}: {len(hits)}: {hits[:3]}" for page, hits in found.items())


# --- every page in a real browser -------------------------------------------------------

BROWSER = ROOT / "tests" / "browser"
#: Served by a web server at any missing path, so its links are site-absolute: not a file:// page.
NOT_FROM_FILES = {"404.html"}


def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    for package in ("puppeteer-core", "@sparticuz/chromium"):
        if not (BROWSER / "node_modules" / package / "package.json").is_file():
            return f"{package} is not installed: run `npm ci --prefix tests/browser`"
    return None


def _page_problems(page: dict) -> list[str]:
    checks = {"katex_errors": "KaTeX errors", "stray_dollars": "$ outside math and code",
              "console_errors": "console errors", "failed_requests": "failed requests",
              "broken_images": "broken images"}
    problems = [f"{label}: {page[key][:3]}" for key, label in checks.items() if page[key]]
    if page["untypeset"]:
        problems.append(f"{page['untypeset']} formulas not typeset")
    return problems


@needs_mkdocs
def test_every_page_renders_in_chromium(built_site, capsys):
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI must run the browser test, but {missing}")
        pytest.skip(missing)
    shots = Path(os.environ.get("EFF_ATTN_SCREENSHOTS") or ROOT / "site-screenshots")
    if shots == ROOT / "site-screenshots":
        shutil.rmtree(shots, ignore_errors=True)
    result = subprocess.run(["node", str(BROWSER / "check_site.mjs"), str(built_site), str(shots)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    (shots / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    pages = {page["path"]: page for page in report["pages"]}
    built = {str(p.relative_to(built_site).as_posix()) for p in built_site.rglob("*.html")} - NOT_FROM_FILES
    assert set(pages) == built, f"pages not checked: {sorted(built - set(pages))}"
    assert len(pages) >= 20
    failures = {path: _page_problems(page) for path, page in pages.items()}
    failures = {path: problems for path, problems in failures.items() if problems}
    with capsys.disabled():                              # the count shows in every run's output
        print(f"\n{report['chromium']}: {len(pages)} pages checked, {len(failures)} with problems; "
              f"screenshots in {shots}")
    assert not failures, "pages that render wrong in Chromium:\n" + "\n".join(
        f"{path}: " + "; ".join(problems) for path, problems in failures.items())


# --- figures ---------------------------------------------------------------------------

def _overlapping_tick_labels(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
                      if t.get_visible() and t.get_text()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
            found += [f"{ax.get_title()!r}: {a!r} and {b!r}" for i, (a, box_a) in enumerate(boxes)
                      for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
    return found


def test_exact_time_memory_figure_has_readable_ticks():
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("exact_figures", ROOT / "scripts" / "figures" / "exact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = json.loads((ROOT / "benchmarks" / "cpu" / "exact" / "results.json").read_text())
    fig = module.time_memory_figure(data)
    try:
        assert not _overlapping_tick_labels(fig)
    finally:
        module.plt.close(fig)


# --- numbers from committed runs ------------------------------------------------------

def _numbers_publisher():
    spec = importlib.util.spec_from_file_location("publish_docs_numbers", ROOT / "scripts" / "publish_docs_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_numbers_match_their_committed_runs():
    assert _numbers_publisher().main(["--check"]) == 0, "run python scripts/publish_docs_numbers.py"


def test_generated_table_block(tmp_path):
    publisher = _numbers_publisher()
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"command": "python x.py", "machine": "2 cores", "columns": ["N", "time"],
                               "formats": {"time": "{:.2f} s"}, "rows": [[1024, 0.0625], [2048, None]]}))
    assert publisher.render_table(run) == (
        "| N | time |\n|---|---|\n| 1024 | 0.06 s |\n| 2048 |  |\n\n"
        f"Command: `python x.py`; raw data: `{run.as_posix()}`; 2 cores.\n")
    publisher.RENDERERS["unit-test"] = lambda: "fresh\n"
    try:
        page = "prose\n<!-- BEGIN numbers:unit-test -->\nstale\n<!-- END numbers:unit-test -->\nmore prose\n"
        assert publisher.updated(page) == page.replace("stale", "fresh")
    finally:
        del publisher.RENDERERS["unit-test"]
    with pytest.raises(ValueError, match="numbers:nowhere"):
        publisher.updated("<!-- BEGIN numbers:nowhere -->\n<!-- END numbers:nowhere -->")
