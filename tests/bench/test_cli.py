"""``eff-attn`` command line: help, exit codes and an 80-column table."""

from __future__ import annotations

import argparse
import re

import pytest
from rich.console import Console

from eff_attn import _backend, cli
from eff_attn.bench import report


def test_every_compare_option_has_help():
    parser = cli.build_parser()
    compare = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
    for action in compare._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


@pytest.mark.skipif(_backend.available("cupy")[0], reason="CuPy runs here")
def test_a_backend_that_is_not_installed_is_a_clean_error(tmp_path, capsys):
    code = cli.main(["compare", "--backend", "cupy", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("eff-attn: error: backend='cupy' cannot run here: cupy") and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_an_unknown_backend_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["compare", "--backend", "numpyy", "--out", str(tmp_path)]) == 2
    assert "backend='numpyy' is not one of" in capsys.readouterr().err


def _row(method, budget, budget_name, backend="numba", **numbers):
    base = {"n": 2048, "problem": "clustered", "heads": 8, "d": 64, "dtype": "float32", "causal": False,
            "method": method, "budget": budget, "budget_name": budget_name, "backend": backend, "target": "softmax",
            "rel_fro_median": 9.73e-8, "target_error_median": 9.73e-8, "target_ratio_median": 1.23e-7,
            "err_ratio_median": 1.23e-7, "warm_ms": 12345.6, "peak_mb": 18523.4}
    return {**base, **numbers}


def test_the_table_fits_80_columns_without_cutting_a_number():
    rows = [_row("exact", "blocked", "algorithm"),
            _row("nystrom", 64, "num_landmarks", rel_fro_median=0.973, target_error_median=0.973,
                 target_ratio_median=1.01, warm_ms=0.0123, peak_mb=4.5e-5),
            _row("sparsefinder", 1, "top_clusters", target="entmax 1.25", target_error_median=2.5e-16,
                 rel_fro_median=6.31, target_ratio_median=3.3e-15),
            _row("treeformer_tc", 6, "height", backend="numpy", rel_fro_median=1.5e-12)]
    console = Console(width=80, record=True)
    report.print_table({"rows": rows, "skipped": []}, console=console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for number in ("9.73e-8", "0.973", "1.01", "2.50e-16", "6.31", "12346", "18523", "4.50e-5", "0.0123",
                   "1.50e-12", "entmax 1.25"):
        assert re.search(rf"(^|\s){re.escape(number)}(\s|$)", text, re.M), number
    assert "sparsefinder" in text and "num_landmarks=64" in text


def test_compact_numbers_keep_three_digits_in_eight_characters():
    cases = {0.973: "0.973", 12.345: "12.3", 4096.7: "4097", 9.73e-8: "9.73e-8", 123456: "1.23e5",
             0.0012: "0.00120", 2.5e-16: "2.50e-16", 0.0: "0", float("nan"): "-"}
    for value, text in cases.items():
        assert report.compact(value) == text and len(text) <= 8


def test_the_verdict_needs_a_clear_margin_over_the_uniform_mean():
    assert report._verdict({"target_ratio_median": 0.99995}) == "no"     # the uniform row itself, in float32
    assert report._verdict({"target_ratio_median": 0.5}) == "yes"
    assert report._verdict({"target_ratio_median": 3.2}) == "no"


def test_each_method_keeps_one_colour_in_every_plot():
    from eff_attn import registry
    from eff_attn.bench.plots import method_style

    names = registry.method_names(builtin_only=True) + ["sdpa"]
    colours = [method_style(name)["color"] for name in names]
    assert len(set(colours)) == len(names)                               # built-ins never share a colour
    assert method_style("yoso") == method_style("yoso")
    assert method_style("my_method") == method_style("my_method")         # stable for a user's method too
