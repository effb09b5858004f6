"""Derived quantities of a comparison, on hand-made rows with known answers."""

from __future__ import annotations

import math

import pytest

from eff_attn.bench.report import (crossovers, fastest_within, load_json, markdown_table, pareto_front,
                                   scaling_exponents, write_json)


def row(method, n, warm_ms, err=0.1, backend="numba", budget="default"):
    return {"method": method, "n": n, "warm_ms": warm_ms, "rel_fro_median": err, "backend": backend,
            "budget": budget, "budget_name": "", "err_ratio_median": err, "peak_mb": 1.0}


def test_scaling_exponent_is_the_log_log_slope():
    quadratic = [row("exact", n, 1e-3 * n**2) for n in (1024, 2048, 4096)]
    linear = [row("local", n, 0.5 * n) for n in (1024, 4096)]
    slopes = scaling_exponents(quadratic + linear + [row("yoso", 1024, 3.0)])
    assert slopes[("exact", "default", "numba")] == pytest.approx(2.0)
    assert slopes[("local", "default", "numba")] == pytest.approx(1.0)
    assert ("yoso", "default", "numba") not in slopes                     # one length: no slope


def test_crossover_is_the_first_length_where_a_method_beats_exact_on_its_backend():
    rows = [row("exact", 1024, 10.0), row("exact", 4096, 160.0), row("exact", 4096, 1.0, backend="numpy"),
            row("local", 1024, 20.0), row("local", 4096, 80.0),
            row("performer", 1024, 50.0), row("performer", 4096, 500.0)]
    found = crossovers(rows)
    assert found[("local", "default", "numba")] == 4096
    assert found[("performer", "default", "numba")] is None


def test_pareto_front_drops_dominated_rows():
    a, b, c, d = row("a", 1, 1.0, err=0.5), row("b", 1, 2.0, err=0.6), row("c", 1, 3.0, err=0.1), row("d", 1, 3.0, 0.2)
    assert [r["method"] for r in pareto_front([b, c, a, d])] == ["a", "c"]
    assert pareto_front([]) == []


def test_fastest_within_an_error_target():
    rows = [row("a", 1, 1.0, err=0.5), row("b", 1, 2.0, err=0.2), row("c", 1, 9.0, err=0.01)]
    assert fastest_within(rows, 0.3)["method"] == "b"
    assert fastest_within(rows, 0.6)["method"] == "a"
    assert fastest_within(rows, 0.001) is None


def test_markdown_table_and_json_round_trip(tmp_path):
    rows = [row("exact", 64, 1.25, err=0.0),
            {**row("local", 64, 0.5, err=0.3), "budget": 8, "budget_name": "window", "params": {"window": 8}},
            {**row("sparsefinder", 64, 0.5, err=0.3), "budget": "state=fit", "budget_name": "top_clusters",
             "params": {"state": "fit"}}]
    text = markdown_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| method | budget | backend | rel. error vs softmax (median)")
    assert "| local | window=8 | numba | 0.300 | 0.300 | 0.5 | 1 |" in lines
    assert "| sparsefinder | state=fit | numba | 0.300 | 0.300 | 0.5 | 1 |" in lines       # a default, not a sweep
    rows[0]["rel_fro_median"] = math.nan                                  # written as null, read back as NaN
    path = write_json({"meta": {"config": {}}, "rows": rows, "skipped": []}, tmp_path / "r.json", command="x")
    back = load_json(path)
    assert back["meta"]["command"] == "x" and math.isnan(back["rows"][0]["rel_fro_median"])
    assert back["derived"]["scaling_exponent"] == {}


def test_best_time_is_the_fastest_warm_call():
    from eff_attn.bench.measure import best_time

    calls = []
    durations = iter([0.0, 0.03, 0.01, 0.02])                             # warm-up, then three timed calls

    def fn():
        import time

        calls.append(1)
        time.sleep(next(durations))

    t = best_time(fn, 3)
    assert len(calls) == 4 and 0.01 <= t < 0.02
