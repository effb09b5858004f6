"""``eff-attn compare`` end to end on tiny problems (NumPy backend, no timing claims)."""

from __future__ import annotations

import json

import pytest

from eff_attn import cli
from eff_attn.bench.runner import CompareConfig, run_compare


@pytest.fixture(scope="module")
def small_result():
    config = CompareConfig(methods=["exact", "uniform", "local", "performer", "yoso"], backends=["numpy"],
                           ns=[48, 96], problem="gaussian", heads=2, d=8, dtype="float64", budgets="default",
                           seeds=2, repeats=1, sdpa=False)
    return run_compare(config)


def by(result, method, n):
    (match,) = [r for r in result["rows"] if r["method"] == method and r["n"] == n]
    return match


def test_every_method_and_length_has_a_row(small_result):
    assert {(r["method"], r["n"]) for r in small_result["rows"]} == {
        (m, n) for m in ("exact", "uniform", "local", "performer", "yoso") for n in (48, 96)}
    assert small_result["skipped"] == []
    env = small_result["meta"]["environment"]
    assert {"eff_attn", "numpy", "python", "cpu"} <= set(env) | set(env.get("versions", {}))


def test_errors_are_measured_against_float64_exact(small_result):
    for n in (48, 96):
        assert by(small_result, "exact", n)["rel_fro_median"] < 1e-12
        uniform = by(small_result, "uniform", n)
        assert uniform["err_ratio_median"] == pytest.approx(1.0)
        assert 0.05 < uniform["rel_fro_median"] < 1.5
        local = by(small_result, "local", n)                             # window 128 >= N: exact
        assert local["rel_fro_median"] < 1e-12
        performer = by(small_result, "performer", n)                     # a real approximation
        assert 1e-3 < performer["rel_fro_median"] <= performer["rel_fro_p90"]


def test_rows_carry_time_memory_and_flops(small_result):
    for r in small_result["rows"]:
        assert r["warm_ms"] > 0 and r["warm_ms_q25"] <= r["warm_ms"] <= r["warm_ms_q75"]
        assert r["compile_s"] >= 0 and r["peak_mb"] >= 0 and r["cell_s"] >= r["warm_ms"] / 1e3
    exact = by(small_result, "exact", 96)
    assert exact["flops"] == 2 * 96 * 96 * (2 * 8 + 2 * 8 + 5)


def test_unsupported_options_are_reported_as_skipped_not_dropped():
    config = CompareConfig(methods=["exact", "yoso"], backends=["numpy"], ns=[32], problem="gaussian", heads=1, d=4,
                           budgets="default", seeds=1, repeats=1, sdpa=False, causal=True)
    result = run_compare(config)
    assert [r["method"] for r in result["rows"]] == ["exact"]
    (skip,) = result["skipped"]
    assert skip["method"] == "yoso" and "causal" in skip["reason"]


def test_cli_writes_json_and_plots(tmp_path):
    code = cli.main(["compare", "--methods", "exact,uniform,local", "--backend", "numpy", "--n", "32,64",
                     "--problem", "clustered", "--heads", "2", "--d", "4", "--budget", "default", "--seeds", "1",
                     "--repeats", "1", "--no-sdpa", "--out", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["rows"]) == 6 and "command" in payload["meta"]
    assert set(payload["derived"]) == {"scaling_exponent", "crossover_n_vs_exact"}
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs and all((tmp_path / p).stat().st_size > 1000 for p in pngs)


def test_cli_rejects_an_unknown_method(tmp_path, capsys):
    code = cli.main(["compare", "--methods", "nope", "--out", str(tmp_path)])
    assert code != 0
    assert "method='nope' is not a known method" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_default_budget_runs_a_method_that_needs_a_fitted_state():
    config = CompareConfig(methods=["sparsefinder"], backends=["numpy"], ns=[40], problem="clustered", heads=1, d=8,
                           budgets="default", seeds=1, repeats=1, sdpa=False)
    result = run_compare(config)
    assert result["skipped"] == []
    (row,) = result["rows"]
    assert row["params"] == {"state": "fit"} and row["rel_fro_median"] < 2
