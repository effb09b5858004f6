"""The committed benchmark results are complete and the docs show them as they are."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "benchmarks").glob("*/*/results.json"))


def _publisher():
    spec = importlib.util.spec_from_file_location("publish_benchmarks", ROOT / "scripts" / "publish_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RESULTS, ids=[str(p.parent.relative_to(ROOT / "benchmarks")) for p in RESULTS])
def test_results_record_command_device_and_versions(path):
    payload = json.loads(path.read_text())
    meta = payload["meta"]
    assert meta["command"].startswith("eff-attn compare")
    assert {"cpu", "python", "versions", "date"} <= set(meta["environment"])
    assert payload["rows"], "no rows"
    for row in payload["rows"]:
        assert row["warm_ms"] > 0


def test_docs_tables_match_the_committed_results():
    publisher = _publisher()
    assert publisher.main(["--check"]) == 0, "run python scripts/publish_benchmarks.py"


def test_every_committed_run_is_published():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for path in RESULTS:
        name = str(path.parent.relative_to(ROOT / "benchmarks"))
        assert f"<!-- BEGIN {name} -->" in text, name
