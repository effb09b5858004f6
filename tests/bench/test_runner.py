"""``eff-attn compare`` end to end on tiny problems (NumPy backend, no timing claims)."""

from __future__ import annotations

import json

import numpy as np
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
    assert row["params"] == {"state": "fit", "predictor": "distance"} and row["rel_fro_median"] < 2
    assert row["budget"] == "state=fit, predictor=distance"                   # not the unused top_clusters


def test_the_default_run_is_one_budget_per_method_and_the_sweep_is_behind_a_flag():
    assert CompareConfig().budgets == "default"
    parser = cli.build_parser()
    assert parser.parse_args(["compare"]).budget == "default"
    assert parser.parse_args(["compare", "--sweep"]).budget == "all"
    assert parser.parse_args(["compare", "--budget", "all"]).budget == "all"


def test_each_method_is_judged_against_its_own_target():
    config = CompareConfig(methods=["exact", "uniform", "entmax", "yoso"], backends=["numpy"], ns=[40],
                           problem="clustered", heads=2, d=8, dtype="float64", seeds=1, repeats=1, sdpa=False)
    result = run_compare(config)
    rows = {r["method"]: r for r in result["rows"]}
    assert {m: r["target"] for m, r in rows.items()} == {"exact": "softmax", "uniform": "softmax",
                                                         "entmax": "entmax 1.5", "yoso": "YOSO-E"}
    entmax = rows["entmax"]                              # exact at its own job, far from softmax on clusters
    assert entmax["target_error_median"] < 1e-10 and entmax["rel_fro_median"] > 0.05
    assert entmax["beats_uniform"] is True
    assert rows["uniform"]["target_ratio_median"] == pytest.approx(1.0) and rows["uniform"]["beats_uniform"] is False
    assert rows["exact"]["beats_uniform"] is True
    for r in rows.values():                              # softmax targets: the two errors are one number
        if r["target"] == "softmax":
            assert r["target_error_median"] == r["rel_fro_median"]


def test_yoso_target_is_the_expectation_of_its_collision_kernel():
    """The YOSO-E reference equals the spec's formula, written here independently: y = normalise((1 - acos(x)/pi)^tau v)."""
    from eff_attn import metrics
    from eff_attn.bench.runner import _Truth
    from eff_attn.bench.targets import target_of

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 24, 8)) for _ in range(3))
    target = target_of("yoso", {"tau": 5, "damping": 1.0, "normalize_output": True})
    got = _Truth(q, k, v, False).output(target)                                      # (2, 24, 8)
    qh = q / np.linalg.norm(q, axis=-1, keepdims=True)                              # (2, 24, 8)
    kh = k / np.linalg.norm(k, axis=-1, keepdims=True)                              # (2, 24, 8)
    p = (1 - np.arccos(np.clip(qh @ np.swapaxes(kh, -1, -2), -1, 1)) / np.pi) ** 5  # (2, 24, 24)
    u = p @ v                                                                        # (2, 24, 8)
    want = u / np.linalg.norm(u, axis=-1, keepdims=True)                            # (2, 24, 8)
    assert np.max(metrics.rel_frobenius(got, want)) < 1e-12


def test_progress_advances_by_expected_cost_and_ends_at_its_total():
    from eff_attn import registry
    from eff_attn.bench.runner import expected_cost

    calls = []
    config = CompareConfig(methods=["exact", "local"], backends=["numpy"], ns=[32], problem="gaussian", heads=1,
                           d=4, seeds=1, repeats=1, sdpa=False)
    run_compare(config, progress=lambda label, advance, total: calls.append((label, advance, total)))
    totals = {total for _, _, total in calls}
    assert len(totals) == 1 and sum(a for _, a, _ in calls) == pytest.approx(totals.pop())
    big = CompareConfig(heads=8, d=64)
    tree = registry.get_method("treeformer_tf")
    fitted = expected_cost(tree, {"tree_init": "fit"}, 2048, big)
    assert fitted > 2 * expected_cost(tree, {"tree_init": "pca_median"}, 2048, big)   # fitting dominates
    exact = registry.get_method("exact")
    assert expected_cost(exact, {}, 4096, big) > 3 * expected_cost(exact, {}, 2048, big)  # quadratic in N


def _record_sdpa(monkeypatch):
    torch = pytest.importorskip("torch")
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v, kwargs))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return torch, seen


def test_sdpa_is_called_as_a_user_calls_it_4d_contiguous_on_the_fused_path(monkeypatch):
    torch, seen = _record_sdpa(monkeypatch)
    config = CompareConfig(methods=["uniform"], backends=["numpy"], ns=[64], problem="gaussian", heads=2, d=16,
                           seeds=1, repeats=1)
    result = run_compare(config)
    assert seen
    for q, k, v, _ in seen:
        for t in (q, k, v):
            assert t.shape == (1, 2, 64, 16) and t.is_contiguous() and t.dtype == torch.float32
    user = torch.randn(1, 2, 64, 16)                                         # (B, H, N, D), as users write it
    from torch.nn.attention import SDPBackend

    chosen = torch._fused_sdp_choice(*seen[0][:3], is_causal=False)
    assert chosen == torch._fused_sdp_choice(user, user, user, is_causal=False) == int(SDPBackend.FLASH_ATTENTION)
    assert torch._fused_sdp_choice(user[0], user[0], user[0]) == int(SDPBackend.MATH)   # what 3-D input got
    (sdpa,) = [r for r in result["rows"] if r["method"] == "sdpa"]
    assert sdpa["rel_fro_median"] < 1e-5 and sdpa["backend"] == "torch-cpu"


def test_without_torch_the_sdpa_row_is_skipped_with_its_reason(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)                          # import torch raises ImportError
    code = cli.main(["compare", "--methods", "uniform", "--backend", "numpy", "--n", "32", "--heads", "1", "--d",
                     "4", "--seeds", "1", "--repeats", "1", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["uniform"]
    (skip,) = payload["skipped"]
    assert skip["method"] == "sdpa" and "torch is not installed" in skip["reason"]
    out = capsys.readouterr().out
    assert "sdpa" in out and "skipped" in out and "torch is not installed" in out


def test_compile_ahead_fills_a_cold_cache_and_skips_a_warm_one(tmp_path):
    """In a fresh process with an empty Numba cache: the pass compiles uniform's kernels, then has nothing to do."""
    code = (
        "import json; from eff_attn import registry; "
        "from eff_attn.bench.runner import CompareConfig; from eff_attn.bench.warmup import cold_tasks, "
        "compile_ahead, has_cached_kernels; "
        "m = registry.get_method('uniform'); c = CompareConfig(methods=['uniform'], ns=[64], heads=1, d=8); "
        "cells = [(64, m, {}, 'numba')]; before = has_cached_kernels(m); tasks = cold_tasks(c, cells); "
        "first = compile_ahead(tasks, 2); after = has_cached_kernels(m); "
        "second = compile_ahead(cold_tasks(c, cells), 2); "
        "print(json.dumps([before, sorted(first), after, second, compile_ahead(tasks, 1)]))"
    )
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    before, first, after, second, serial = json.loads(result.stdout.strip().splitlines()[-1])
    assert (before, first, after, second, serial) == (False, ["uniform"], True, {}, {})


def test_cold_tasks_put_exact_first_then_the_longest_compiles(monkeypatch):
    """exact's float64 kernels are every task's target, so it goes first; then longest first (LPT)."""
    from eff_attn import registry
    from eff_attn.bench import warmup
    from eff_attn.bench.runner import CompareConfig

    monkeypatch.setattr(warmup, "has_cached_kernels", lambda method: False)
    monkeypatch.setattr(warmup, "COMPILE_S", {"exact": 1.0, "uniform": 5.0, "yoso": 30.0, "local": 20.0})
    names = ["uniform", "local", "exact", "yoso"]
    cells = [(64, registry.get_method(n), {}, "auto") for n in names]
    tasks = warmup.cold_tasks(CompareConfig(methods=names, ns=[64]), cells)
    assert [t["method"] for t in tasks] == ["exact", "yoso", "local", "uniform"]
