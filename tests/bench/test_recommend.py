"""eff_attn.bench.recommend and ``eff-attn compare --problem heads.npz --target``.

The sweep is checked on heads whose answer is known by construction: banded
heads, whose attention is exactly local (a query's weight on a key d positions
away is exp(-R (1 - cos(theta d))), below 1e-30 beyond 8 positions), so local
attention with any window of the sweep is exact to float32 while the
low-rank and kernel methods are far off. The decision logic is checked on
hand-made rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from eff_attn import cli
from eff_attn.bench.problems import AttentionProblem
from eff_attn.bench.recommend import choose, downstream_change, recommend, verdict
from eff_attn.capture import HeadRecorder

N, D, HEADS = 96, 8, 3


def banded_heads(n=N, d=D, heads=HEADS, seed=0):
    """q_i . k_j / sqrt(D) = R cos(theta (i - j)) with theta (n - 1) < pi: no wrap-around, peaked at j = i."""
    theta = np.pi / (2 * n)
    radius = 60.0 / (1 - np.cos(8 * theta))                       # weight ratio at distance 8: e^-60
    angle = theta * np.arange(n)                                   # (n,)
    unit = np.zeros((n, d))
    unit[:, 0], unit[:, 1] = np.cos(angle), np.sin(angle)          # (n, d)
    q = np.broadcast_to(np.sqrt(radius) * d ** 0.25 * unit, (heads, n, d)).copy()   # (heads, n, d)
    v = np.random.default_rng(seed).standard_normal((heads, n, d))  # (heads, n, d)
    return q, q.copy(), v


def write_banded(path, n=N):
    rec = HeadRecorder(model="banded")
    q, k, v = banded_heads(n)
    rec(q, k, v)
    return rec.save(path, dtype="float64")


@pytest.fixture(scope="module")
def banded_result():
    q, k, v = banded_heads()
    problem = AttentionProblem("banded", q, k, v)
    return recommend(problem, 1e-4, methods=["exact", "uniform", "local", "performer", "nystrom"],
                     backends=("numpy",), dtype="float64", seeds=1, repeats=1, sdpa=False)


def test_exactly_local_heads_are_met_by_local_and_by_no_global_approximation(banded_result):
    decision = banded_result["decision"]
    assert decision["per_method"]["local"] is not None
    local_rows = [r for r in banded_result["rows"] if r["method"] == "local"]
    assert len(local_rows) == 5 and all(r["rel_fro_p90"] < 1e-10 for r in local_rows)   # every window is exact
    for name in ("uniform", "performer", "nystrom"):
        assert decision["per_method"][name] is None, name
        assert decision["closest"][name]["rel_fro_p90"] > 1e-3
    assert decision["best"]["method"] == "local"


def test_rows_carry_errors_time_memory_and_flops(banded_result):
    for r in banded_result["rows"]:
        assert r["rel_fro_median"] <= r["rel_fro_p90"] + 1e-15
        assert r["warm_ms"] > 0 and r["peak_mb"] >= 0 and r["flops"] > 0
    (exact,) = [r for r in banded_result["rows"] if r["method"] == "exact" and r["budget"] == "naive"]
    assert exact["flops"] == HEADS * N * N * (2 * D + 2 * D + 5)
    assert exact["rel_fro_p90"] < 1e-12


def row(method, warm_ms, median, p90, budget=1):
    return {"method": method, "budget_name": "b", "budget": budget, "params": {"b": budget}, "backend": "numpy",
            "warm_ms": warm_ms, "rel_fro_median": median, "rel_fro_p90": p90, "peak_mb": 1.0, "flops": 10**9}


def test_choice_is_the_fastest_method_meeting_the_target_at_p90():
    rows = [row("exact", 10.0, 0, 0), row("a", 6.0, 0.05, 0.09), row("a", 4.0, 0.08, 0.3, budget=0),
            row("b", 2.0, 0.05, 0.15), row("c", 5.0, 0.01, 0.02), row("uniform", 0.1, 0.001, 0.001)]
    decision = choose(rows, 0.1)
    assert decision["per_method"]["a"]["budget"] == 1                      # budget 0 misses at p90
    assert decision["per_method"]["b"] is None and decision["closest"]["b"]["rel_fro_p90"] == 0.15
    assert decision["best"]["method"] == "c" and decision["choice"] is decision["best"]   # uniform: a yardstick
    text = verdict(decision, heads=4, n=64)
    assert text.startswith("Use `c` with b=1") and "0.50x the time" in text


def test_exact_is_chosen_when_no_qualifying_method_is_faster():
    rows = [row("exact", 1.0, 0, 0), row("a", 3.0, 0.01, 0.02)]
    decision = choose(rows, 0.1)
    assert decision["best"]["method"] == "a" and decision["choice"]["method"] == "exact"
    assert verdict(decision, heads=4, n=64).startswith("Use exact attention (1 ms)")
    decision = choose([row("exact", 1.0, 0, 0), row("a", 0.5, 0.2, 0.4)], 0.1)
    assert decision["best"] is None and decision["choice"]["method"] == "exact"
    assert "no method meets the error target 0.1" in verdict(decision, heads=4, n=64)
    with pytest.raises(ValueError, match="target must be a positive"):
        choose(rows, 0)


def test_downstream_change_against_attention_computed_by_hand():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a) for a in np.random.default_rng(1).standard_normal((3, 1, 2, 16, 4)))

    def model(scale):                                                        # output: the attention itself
        return torch.nn.functional.scaled_dot_product_attention(q, k, v) * scale

    same = downstream_change(model, [1.0], "exact", {}, backend="numpy", output="logits")
    assert same["cosine_min"] == pytest.approx(1, abs=1e-12) and same["kl_max"] == pytest.approx(0, abs=1e-12)
    moved = downstream_change(model, [1.0, 2.0], "uniform", {}, backend="numpy")
    exact = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v                # (1, 2, 16, 4)
    mean = v.mean(-2, keepdim=True).expand_as(exact)                          # uniform: the mean of the values
    cos = torch.nn.functional.cosine_similarity(exact, mean, dim=-1)
    assert moved["vectors"] == 64
    assert moved["cosine_mean"] == pytest.approx(cos.mean().item(), rel=1e-10)
    assert moved["cosine_min"] == pytest.approx(cos.min().item(), rel=1e-10)


def test_cli_answers_for_a_heads_file(tmp_path, capsys):
    heads = write_banded(tmp_path / "banded.npz", n=128)
    code = cli.main(["compare", "--problem", str(heads), "--target", "1e-4", "--n", str(N), "--backend", "numpy",
                     "--methods", "local,performer", "--dtype", "float64", "--repeats", "1", "--seeds", "1",
                     "--no-sdpa", "--out", str(tmp_path / "out")])
    assert code == 0
    text = capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "recommendation.json").read_text())
    assert payload["problem"]["n"] == N and payload["problem"]["heads"] == HEADS     # --n crops the file's 128
    assert payload["decision"]["best"]["method"] == "local"
    assert {r["method"] for r in payload["rows"]} == {"exact", "local", "performer"}
    assert "window=" in text and payload["verdict"].split(":")[0] in text.replace("\n", " ")
    assert (tmp_path / "out" / "recommendation.png").stat().st_size > 1000


def test_cli_refuses_a_model_without_a_target_and_a_missing_file(tmp_path, capsys):
    assert cli.main(["compare", "--problem", "real", "--model", "x:y", "--out", str(tmp_path)]) == 2
    assert "--model needs --target" in capsys.readouterr().err
    assert cli.main(["compare", "--problem", str(tmp_path / "none.npz"), "--target", "0.1"]) == 2
    assert "is neither a regime" in capsys.readouterr().err


def test_table_fits_80_columns_without_cutting_a_number():
    from eff_attn.bench.recommend import table_lines

    rows = [{**row("exact", 12345.6, 1.234e-7, 0.00657), "budget_name": "algorithm", "budget": "blocked",
             "params": {"algorithm": "blocked"}},
            {**row("treeformer_tf", 0.00123, 0.5, 0.987654), "peak_mb": 1234.5, "flops": 3 * 10**12}]
    lines = table_lines({"decision": choose(rows, 0.1)})
    assert max(len(line) for line in lines) <= 80
    assert "algorithm=blocked" in lines[2] and "1.2e-7" in lines[2] and "1.2e4" in lines[2]
    assert "treeformer_tf" in lines[3] and "1.2e-3" in lines[3] and "0.988" in lines[3] and "3000" in lines[3]
