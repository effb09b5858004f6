"""The documentation works: tutorials run, the site builds offline.

- Every ``python`` code block of each page in ``docs/tutorials/`` runs, in order,
  in one namespace per page (so a tutorial cannot rot).
- ``mkdocs build --strict`` succeeds, and the built site loads nothing from the
  network: no ``src``/``href`` attribute or CSS ``url()`` points off-site, and the
  theme's web fonts are off.
- If a headless Chromium is installed, a method page is rendered and its math must
  have been typeset by the vendored KaTeX.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
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


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@needs_mkdocs
@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine")
def test_math_is_typeset_by_the_vendored_katex(built_site):
    page = built_site / "methods" / "exact" / "index.html"
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert 'class="katex' in result.stdout, "KaTeX did not render the math offline"
