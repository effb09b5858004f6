"""The committed benchmark results are complete and the docs show them as they are."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "benchmarks").glob("*/*/results.json"))
WALLTIME = [p for p in RESULTS if json.loads(p.read_text()).get("kind") == "compare-walltime"]
COMPARE = [p for p in RESULTS if "rows" in json.loads(p.read_text()) and p not in WALLTIME]
#: runs of the other benchmark scripts, each quoted on one docs page: (results folder, page, marker or path)
SCRIPT_RUNS = {
    "cpu/kernels": ("docs/methods/exact.md", "<!-- BEGIN kernels -->"),
    "cpu/defaults-real": ("docs/methods/routing.md", "benchmarks/cpu/defaults-real/results.json"),
}


def _publisher():
    spec = importlib.util.spec_from_file_location("publish_benchmarks", ROOT / "scripts" / "publish_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", COMPARE, ids=[str(p.parent.relative_to(ROOT / "benchmarks")) for p in COMPARE])
def test_results_record_command_device_and_versions(path):
    payload = json.loads(path.read_text())
    meta = payload["meta"]
    assert meta["command"].startswith("eff-attn compare")
    assert {"cpu", "python", "versions", "date"} <= set(meta["environment"])
    assert payload["rows"], "no rows"
    for row in payload["rows"]:
        assert row["warm_ms"] > 0


@pytest.mark.parametrize("path", WALLTIME, ids=[str(p.parent.relative_to(ROOT / "benchmarks")) for p in WALLTIME])
def test_walltime_results_record_cold_and_warm_runs(path):
    payload = json.loads(path.read_text())
    assert payload["meta"]["command"] == "eff-attn compare" and "cpu" in payload["meta"]["environment"]
    assert payload["cold_s"] > 0 and payload["warm_s"] and all(w > 0 for w in payload["warm_s"])
    assert payload["cold_run"]["cells"], "no cells"


def test_docs_tables_match_the_committed_results():
    publisher = _publisher()
    assert publisher.main(["--check"]) == 0, "run python scripts/publish_benchmarks.py"


def _name(path):
    return str(path.parent.relative_to(ROOT / "benchmarks"))


def test_every_committed_run_is_published():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for path in RESULTS:
        name = _name(path)
        if name in SCRIPT_RUNS:
            page, marker = SCRIPT_RUNS[name]
            assert marker in (ROOT / page).read_text(), (name, page)
        else:
            assert f"<!-- BEGIN {name} -->" in text, name


@pytest.mark.parametrize("path", [p for p in RESULTS if _name(p) in SCRIPT_RUNS], ids=_name)
def test_script_runs_record_command_and_environment(path):
    payload = json.loads(path.read_text())
    meta = payload.get("meta", payload)
    assert meta["command"].startswith("python scripts/")
    environment = meta.get("environment") or meta.get("machine") or meta.get("env")
    assert environment, "no machine description"
