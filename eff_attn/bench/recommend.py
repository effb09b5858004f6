"""Which method fits *my* heads? ``eff-attn compare --problem my_heads.npz --target 0.1``.

Given attention heads (a file written by :mod:`eff_attn.capture`, or a
regime) and an error target, :func:`recommend`:

1. runs every method's budget sweep on the heads (float32 by default),
   scoring each output per head against float64 exact attention;
2. keeps, per method, the fastest budget whose relative Frobenius error
   meets the target at the 90th percentile over heads (so at the median
   too): :func:`eff_attn.bench.report.fastest_within` on ``rel_fro_p90``;
3. names the fastest of those, or exact attention when none is faster
   than it, in plain words, with the table behind it and a plot.

Every method is judged against the model's own attention, softmax: entmax
and Sparsefinder compute a different function, and their error here is how
far that moves your heads' outputs. ``uniform`` and ``topk_oracle`` are
shown as yardsticks, never recommended (the oracle reads the exact scores).

With ``--model module:factory`` (PyTorch), :func:`downstream_change` swaps
the chosen method into the model through :mod:`eff_attn.torch` and reports
how much the model's own outputs move on its inputs. ``factory()`` returns
``(model, inputs)`` or ``(model, inputs, output)``: ``model`` is a callable
(an ``nn.Module``) whose attention calls
``torch.nn.functional.scaled_dot_product_attention``, ``inputs`` a list of
forward-pass arguments (a tensor, a tuple or a dict each) and ``output``
``"embedding"`` (cosine similarity of the output vectors, the default) or
``"logits"`` (KL divergence of the softmax over the last axis, and top-1
agreement). ``module`` is an importable module or a ``path/to/file.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .. import _backend, api, metrics, registry
from ..registry import NotSupportedError
from .measure import measure_call
from .report import budget_label, fastest_within, pareto_front, progress_bar
from .targets import target_backend

__all__ = ["sweep", "choose", "recommend", "downstream_change", "load_model_spec", "print_report",
           "write_outputs", "run_from_cli", "YARDSTICKS"]

#: Shown for context, never recommended.
YARDSTICKS = {"uniform": "the mean of the values", "topk_oracle": "an oracle that reads the exact scores",
              "sdpa": "exact attention in torch"}

#: Relative wall time of one sweep cell per method (1 = a ``local`` cell), for the progress bar's ETA: rough
#: figures from one run on the MiniLM heads at n = 512 on a shared 2-core CPU, where fitting the
#: Treeformer trees and the Sparsefinder state dominates the whole sweep.
CELL_COST = {"treeformer_tf": 100.0, "treeformer_tc": 100.0, "sparsefinder": 40.0, "routing": 3.0, "yoso": 2.5,
             "reformer": 2.5, "performer": 2.0, "entmax": 2.0, "kdeformer": 1.5, "nystrom": 1.5}

_ERRORS = ("rel_fro", "err_ratio")


def _truth(q, k, v, causal):
    """float64 exact attention and the uniform mean, per head: (heads, n, Dv) each."""
    backend = target_backend(q.shape[0], q.shape[1], k.shape[1])
    exact = api.attention(q, k, v, method="exact", backend=backend, causal=causal, algorithm="blocked")
    uniform = api.attention(q, k, v, method="uniform", backend=backend, causal=causal)
    return exact, uniform


def _scores(out, exact, uniform) -> dict:
    fro = metrics.rel_frobenius(out, exact)                                          # (heads,)
    base = np.maximum(metrics.rel_frobenius(uniform, exact), np.finfo(float).tiny)  # (heads,)
    return {"rel_fro": fro, "err_ratio": fro / base}


def _row(method, budget, backend, scores, timing, mem, flops) -> dict:
    """One sweep cell, with the keys of ``eff-attn compare``'s rows (so the report helpers apply)."""
    row = {"method": method.name if hasattr(method, "name") else method,
           "budget_name": getattr(method, "budget_name", ""), "params": dict(budget), "backend": backend}
    name = row["budget_name"]
    row["budget"] = budget[name] if name in budget else (", ".join(f"{k}={v}" for k, v in budget.items()) or "default")
    for key in _ERRORS:
        values = np.concatenate([np.ravel(s) for s in scores[key]])                # (heads * seeds,)
        row[f"{key}_median"], row[f"{key}_p90"] = float(np.median(values)), float(np.percentile(values, 90))
    row.update(warm_ms=1e3 * timing.warm_median_s, warm_ms_q25=1e3 * timing.warm_q25_s,
               warm_ms_q75=1e3 * timing.warm_q75_s, repeats=timing.repeats, compile_s=timing.compile_s,
               peak_mb=mem / 2**20, flops=None if flops is None else int(flops))
    return row


def _cell(method, budget, backend, arrays, truth, *, causal, seeds, repeats, time_budget_s):
    calls = [api.prepare(*arrays, method=method.name, backend=backend, causal=causal, rng=seed, **budget)
             for seed in range(seeds if method.randomized else 1)]
    measured = measure_call(calls[0].run_forward, repeats=repeats, time_budget_s=time_budget_s)
    outputs = [measured.result] + [call.run_forward() for call in calls[1:]]   # seed 0's from its warm call
    scores = {key: [] for key in _ERRORS}
    for call, (out, _) in zip(calls, outputs):
        for key, value in _scores(call.problem.unflatten(out), *truth).items():
            scores[key].append(value)
    call = calls[0]
    flops = api.build_info(call, outputs[0][1])["flops"]
    return _row(method, budget, call.impl.backend, scores, measured.timing, measured.peak_bytes, flops)


def _sdpa_row(arrays, truth, causal, repeats):
    """torch's SDPA on (1, heads, n, D) tensors, as a user calls it (fused kernel on the CPU)."""
    import torch

    q, k, v = (torch.from_numpy(a)[None] for a in arrays)                  # (1, heads, n, D)

    def call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

    measured = measure_call(call, repeats=repeats)
    out = measured.result[0].numpy()                                        # (heads, n, Dv)
    heads, n, d = arrays[0].shape
    flops = heads * n * n * (2 * d + 2 * arrays[2].shape[-1] + 5)
    scores = {key: [value] for key, value in _scores(out, *truth).items()}
    return _row("sdpa", {}, "torch-cpu", scores, measured.timing, measured.peak_bytes, flops)


def sweep(problem, *, causal=False, methods=None, backends=("auto",), dtype="float32", seeds=1, repeats=5,
          time_budget_s=0.5, sdpa=True, progress=None) -> tuple[list, list]:
    """Every method x budget x backend on ``problem``'s heads; returns ``(rows, skipped)``.

    ``progress(label, advance)`` is called before (advance 0) and after each
    cell, with the cell's expected cost (:data:`CELL_COST`) as the advance.
    """
    names = list(methods) if methods else registry.method_names()
    arrays = problem.astype(np.dtype(dtype))
    truth = _truth(*problem.astype(np.float64), causal)
    rows, skipped = [], []
    for name in names:
        method = registry.get_method(name)
        for budget in method.sweep(arrays[1].shape[-2]):
            for backend in backends:
                label = f"{name} {', '.join(f'{k}={v}' for k, v in budget.items()) or 'default'} [{backend}]"
                if progress is not None:
                    progress(label, 0)
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    rows.append(_cell(method, dict(budget), backend, arrays, truth, causal=causal, seeds=seeds,
                                      repeats=repeats, time_budget_s=time_budget_s))
                    rows[-1].update(cell_s=time.perf_counter() - start, cell_cpu_s=time.process_time() - start_cpu)
                except (NotSupportedError, ValueError) as exc:
                    skipped.append({"method": name, "budget": dict(budget), "backend": backend, "reason": str(exc)})
                if progress is not None:
                    progress(label, CELL_COST.get(name, 1.0))
    if sdpa and importlib.util.find_spec("torch") is not None:
        rows.append(_sdpa_row(arrays, truth, causal, repeats))
    return rows, skipped


def sweep_cost(methods=None, backends=("auto",), *, n: int) -> float:
    """The total of the progress units :func:`sweep` will report at ``n`` keys."""
    names = list(methods) if methods else registry.method_names()
    return sum(CELL_COST.get(name, 1.0) * len(registry.get_method(name).sweep(n)) * len(backends) for name in names)


def choose(rows, target: float) -> dict:
    """Per method the fastest budget meeting ``target`` at p90 (and median); the recommendation.

    Returns a dict with ``per_method`` (name -> row or None), ``closest``
    (name -> the row of lowest p90 error, for methods that miss), ``exact``
    (the fastest exact row), ``best`` (the fastest recommendable row that
    meets the target, or None) and ``choice`` (``best`` if it is faster
    than exact attention, else the exact row).
    """
    if not target > 0:
        raise ValueError(f"target must be a positive relative error, got {target}")
    exact_rows = [r for r in rows if r["method"] == "exact"]
    if not exact_rows:
        raise ValueError("the sweep has no exact attention row to compare against")
    exact = min(exact_rows, key=lambda r: r["warm_ms"])
    per_method, closest = {}, {}
    for name in dict.fromkeys(r["method"] for r in rows):
        items = [r for r in rows if r["method"] == name]
        per_method[name] = fastest_within(items, target, error="rel_fro_p90")
        closest[name] = min(items, key=lambda r: (r["rel_fro_p90"], r["warm_ms"]))
    candidates = [r for name, r in per_method.items() if r is not None and name not in YARDSTICKS
                  and name != "exact"]
    best = min(candidates, key=lambda r: r["warm_ms"]) if candidates else None
    choice = best if best is not None and best["warm_ms"] < exact["warm_ms"] else exact
    return {"target": target, "per_method": per_method, "closest": closest, "exact": exact, "best": best,
            "choice": choice}


def _describe(row) -> str:
    label = budget_label(row)
    return f"`{row['method']}`" + ("" if label == "default" else f" with {label}")


def verdict(decision: dict, *, heads: int, n: int) -> str:
    """The recommendation in plain words."""
    target, exact, best = decision["target"], decision["exact"], decision["best"]
    where = f"on your {heads} heads at N = {n}"
    if best is None:
        recommendable = [r for name, r in decision["closest"].items() if name not in YARDSTICKS and name != "exact"]
        near = min(recommendable, key=lambda r: r["rel_fro_p90"]) if recommendable else None
        closest = (f" The closest is {_describe(near)}, with error {near['rel_fro_median']:.3g} at the median and "
                   f"{near['rel_fro_p90']:.3g} at p90." if near else "")
        return (f"Use exact attention: no method meets the error target {target:g} {where} within its budget "
                f"sweep.{closest}")
    errors = f"error {best['rel_fro_median']:.3g} at the median and {best['rel_fro_p90']:.3g} at p90"
    ratio = best["warm_ms"] / exact["warm_ms"]
    if decision["choice"] is exact:
        return (f"Use exact attention ({exact['warm_ms']:.3g} ms) {where}: the fastest method that meets the error "
                f"target {target:g}, {_describe(best)} ({errors}), takes {best['warm_ms']:.3g} ms, "
                f"{ratio:.2f}x the time of exact attention. Approximation pays only at longer sequences: "
                "ask again at your longest length with --n.")
    gflop = f", {best['flops'] / 1e9:.3g} GFLOP" if best.get("flops") else ""
    return (f"Use {_describe(best)}: {where} its {errors} meet the target {target:g}, and it takes "
            f"{best['warm_ms']:.3g} ms against {exact['warm_ms']:.3g} ms for exact attention "
            f"({ratio:.2f}x the time), with {best['peak_mb']:.3g} MB peak memory{gflop}.")


def recommend(problem, target: float, *, causal=False, methods=None, backends=("auto",), dtype="float32",
              seeds=1, repeats=5, sdpa=True, progress=None) -> dict:
    """Sweep every method on ``problem`` and recommend one for ``target``; a JSON-ready dict."""
    start = time.perf_counter()
    rows, skipped = sweep(problem, causal=causal, methods=methods, backends=backends, dtype=dtype, seeds=seeds,
                          repeats=repeats, sdpa=sdpa, progress=progress)
    decision = choose(rows, target)
    heads, n, d = problem.q.shape
    return {"problem": {"name": problem.name, "heads": heads, "n": n, "d": d, "dtype": dtype, "causal": causal,
                        "meta": problem.meta},
            "target": target, "rows": rows, "skipped": skipped, "decision": decision,
            "verdict": verdict(decision, heads=heads, n=n), "sweep_s": time.perf_counter() - start}


# --- the downstream check --------------------------------------------------------------------------


def load_model_spec(spec: str):
    """``module:factory`` or ``path/to/file.py:factory`` -> ``(model, inputs, output)``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be module:factory or path/to/file.py:factory, got {spec!r}")
    if module_name.endswith(".py") or Path(module_name).is_file():
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--model: no file {module_name!r}")
        loader = importlib.util.spec_from_file_location(f"eff_attn_model_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[loader.name] = module
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"--model: {module_name} has no {attr!r}")
    made = getattr(module, attr)()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ValueError(f"--model: {spec}() must return (model, inputs) or (model, inputs, output)")
    model, inputs, output = (*made, "embedding")[:3]
    if output not in ("embedding", "logits"):
        raise ValueError(f"--model: output must be 'embedding' or 'logits', got {output!r}")
    return model, list(inputs), output


def _output_array(out) -> np.ndarray:
    """A model's output as a float64 array: a tensor, ``.logits``, or the first of a tuple or dict."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if type(out).__module__.startswith("torch"):
        out = out.detach().to("cpu").double().numpy()
    return np.asarray(out, dtype=np.float64)


def _swap(method, params, backend, rng):
    """An SDPA replacement that runs ``method`` through :mod:`eff_attn.torch`."""
    from .. import torch as eff_torch
    from ..capture import key_keep_mask

    def attend(original, *, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if dropout_p:
            raise ValueError("the downstream check needs dropout_p=0 (run the model in eval mode)")
        if key.shape[-3] != query.shape[-3]:                                 # grouped-query attention
            key, value = (t.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3) for t in (key, value))
        return eff_torch.attention(query, key, value, method=method, backend=backend, mask=key_keep_mask(attn_mask),
                                   causal="top_left" if is_causal else False, scale=scale, rng=rng, **params)

    return attend


def downstream_change(model, inputs, method: str, params: dict, *, backend="auto", output="embedding",
                      seed=0) -> dict:
    """Run ``model`` on ``inputs`` with its own attention and with ``method``; how far its outputs move.

    Returns
    -------
    dict
        ``cosine_mean`` and ``cosine_min`` over the output vectors (last
        axis); for ``output="logits"`` also ``kl_mean``, ``kl_max`` (nats,
        exact || swapped) and ``top1_agreement``.
    """
    import torch

    from ..capture import call_model, patched_sdpa

    rng = np.random.default_rng(seed)                                       # one stream across the layers
    with torch.no_grad():
        reference = [_output_array(call_model(model, x)) for x in inputs]
        with patched_sdpa(_swap(method, params, backend, rng)):
            swapped = [_output_array(call_model(model, x)) for x in inputs]
    a = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference])       # (vectors, width)
    b = np.concatenate([s.reshape(-1, s.shape[-1]) for s in swapped])         # (vectors, width)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
    result = {"method": method, "params": params, "output": output, "vectors": int(len(a)),
              "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if output == "logits":
        log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)             # (vectors, classes)
        log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)             # (vectors, classes)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)                          # (vectors,)
        result.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                      top1_agreement=float((a.argmax(-1) == b.argmax(-1)).mean()))
    return result


def downstream_words(check: dict) -> str:
    who = _describe({"method": check["method"], "params": check["params"],
                     "budget_name": registry.get_method(check["method"]).budget_name,
                     "budget": check["params"].get(registry.get_method(check["method"]).budget_name, "default")})
    text = (f"Swapped into your model, {who} moves its outputs on your {check['vectors']} output vectors to a "
            f"cosine similarity of {check['cosine_mean']:.5f} on average (lowest {check['cosine_min']:.5f}) "
            "against the model's own attention.")
    if "kl_mean" in check:
        text += (f" Logits: KL {check['kl_mean']:.3g} nats on average (largest {check['kl_max']:.3g}); the top-1 "
                 f"class agrees on {100 * check['top1_agreement']:.1f} % of the outputs.")
    return text


# --- output ---------------------------------------------------------------------------------------------


def _short(x) -> str:
    """At most 6 characters: 3 significant digits, an exponent only outside [0.01, 10000)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}" if abs(x) < 1e3 else f"{x:.0f}"
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e")


_COLUMNS = (("method", 13, "<"), ("budget", 17, "<"), ("ok", 3, ">"), ("median", 7, ">"), ("p90", 7, ">"),
            ("ms", 6, ">"), ("/exact", 6, ">"), ("MB", 6, ">"), ("GFLOP", 7, ">"))


def table_lines(result: dict) -> list[str]:
    """The per-method table as fixed-width lines (80 characters)."""
    decision = result["decision"]
    exact_ms = decision["exact"]["warm_ms"]

    def line(cells):
        return " ".join(f"{str(c):{align}{width}}" for c, (_, width, align) in zip(cells, _COLUMNS)).rstrip()

    lines = [line(c[0] for c in _COLUMNS), "-" * (sum(c[1] for c in _COLUMNS) + len(_COLUMNS) - 1)]
    for name, row in decision["per_method"].items():
        shown = row or decision["closest"][name]
        lines.append(line([name + (" *" if name in YARDSTICKS else ""), budget_label(shown),
                           "yes" if row else "no", _short(shown["rel_fro_median"]), _short(shown["rel_fro_p90"]),
                           _short(shown["warm_ms"]), _short(shown["warm_ms"] / exact_ms), _short(shown["peak_mb"]),
                           _short(shown["flops"] / 1e9 if shown["flops"] else None)]))
    return lines


def print_report(result: dict, console=None):
    """The table behind the recommendation, then the verdict (fits 80 columns)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    p, decision = result["problem"], result["decision"]
    console.print(f"[bold]{escape(p['name'])}[/]: {p['heads']} heads, N = {p['n']}, D = {p['d']}, {p['dtype']}"
                  f"{', causal' if p['causal'] else ''}; target {result['target']:g} at p90")
    choice = decision["choice"]
    for text, name in zip(table_lines(result), [None, None, *decision["per_method"]]):
        style = "bold green" if name is not None and decision["per_method"][name] is choice else ""
        console.print(escape(text), style=style, highlight=False)
    console.print("per method: the fastest budget whose p90 error over the heads meets the target (ok), or its "
                  "most accurate one; error relative to float64 exact attention, median and p90 over heads; "
                  "* = a yardstick, not recommended", highlight=False)
    for item in result["skipped"]:
        console.print(f"[yellow]skipped[/] {item['method']} {escape(str(item['budget']))}: "
                      f"{escape(item['reason'].splitlines()[-1].strip())}")
    console.print(f"\n[bold]{escape(result['verdict'])}[/]")
    if "downstream" in result:
        console.print(escape(downstream_words(result["downstream"])))


def plot(result: dict, path) -> Path:
    """Error (p90, with the median below it) against warm time, every sweep cell; the target and exact's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, decision = result["rows"], result["decision"]
    names = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, name in enumerate(names):
        items = [r for r in rows if r["method"] == name]                    # in sweep order
        t = [r["warm_ms"] for r in items]
        p90 = [max(r["rel_fro_p90"], 1e-8) for r in items]
        med = [max(r["rel_fro_median"], 1e-8) for r in items]
        ax.vlines(t, med, p90, color=colours[i % 20], alpha=0.5)
        ax.plot(t, p90, marker="os^D"[i % 4], color=colours[i % 20], label=name, linestyle="-" if len(t) > 1 else "")
    front = pareto_front([r for r in rows if r["method"] not in YARDSTICKS], error="rel_fro_p90")
    ax.plot([r["warm_ms"] for r in front], [max(r["rel_fro_p90"], 1e-8) for r in front], color="0.3",
            linestyle=":", linewidth=1, label="Pareto front")
    ax.axhline(result["target"], color="red", linewidth=1, label=f"target {result['target']:g}")
    ax.axvline(decision["exact"]["warm_ms"], color="0.5", linewidth=1, linestyle="--", label="exact time")
    choice = decision["choice"]
    ax.plot([choice["warm_ms"]], [max(choice["rel_fro_p90"], 1e-8)], marker="*", markersize=16, color="gold",
            markeredgecolor="black", linestyle="", label=f"choice: {choice['method']}")
    p = result["problem"]
    ax.set(xscale="log", yscale="log", xlabel="warm time (ms, median)",
           ylabel="relative error over heads (p90; line to median)",
           title=f"{p['name']}: {p['heads']} heads, N = {p['n']}, target {result['target']:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir, *, command=None, plots=True) -> list[Path]:
    """``recommendation.json`` (and ``recommendation.png``) in ``out_dir``."""
    import json

    from .report import _jsonable
    from .runner import environment

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**result, "meta": {"environment": environment(), "command": command}}
    suffix = "" if result.get("suffix") is None else f"-{result['suffix']}"
    path = out_dir / f"recommendation{suffix}.json"
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    paths = [path]
    if plots:
        paths.append(plot(result, path.with_suffix(".png")))
    return paths


# --- the command line -------------------------------------------------------------------------------


def run_from_cli(args, defaults) -> int:
    """``eff-attn compare ... --target T [--model module:factory]`` (called from :mod:`eff_attn.cli`).

    ``defaults`` are the parsed defaults of ``eff-attn compare``: an option left at its
    default means "the whole file" for a heads file (its lengths and heads).
    """
    from rich.console import Console

    from .problems import is_heads_file, make_problem

    if args.target is None:
        raise ValueError("--model needs --target: the check swaps in the method recommended for that target")
    start = time.perf_counter()
    console = Console() if sys.stdout.isatty() else Console(width=80)
    from_file = is_heads_file(args.problem)
    methods = args.methods or registry.method_names()
    for name in methods:
        registry.get_method(name)                                          # unknown names fail before any work
    if "exact" not in methods:
        methods = ["exact", *methods]
    ns = [None] if from_file and args.n == defaults.n else args.n           # a file: its longest length by default
    heads = None if from_file and args.heads == defaults.heads else args.heads
    model = load_model_spec(args.model) if args.model else None
    backends = tuple(args.backend) if args.backend != ["all"] else tuple(
        b for b in registry.BACKENDS if _backend.available(b)[0])
    command = "eff-attn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for n in ns:
        if from_file:
            problem = make_problem(args.problem, n, heads=heads)
        else:
            problem = make_problem(args.problem, n, d=32 if args.problem == "real" else args.d, heads=args.heads)
        causal = bool(args.causal or problem.meta.get("causal", False))
        with progress_bar(console) as bar:
            task = bar.add_task("sweep", total=sweep_cost(methods, backends, n=problem.k.shape[-2]))
            result = recommend(problem, args.target, causal=causal, methods=methods, backends=backends,
                               dtype=args.dtype, seeds=args.seeds, repeats=args.repeats, sdpa=not args.no_sdpa,
                               progress=lambda label, advance: bar.update(task, description=label, advance=advance))
        if model is not None:
            pick = result["decision"]["best"]
            if pick is not None:
                result["downstream"] = downstream_change(model[0], model[1], pick["method"], pick["params"],
                                                         backend=pick["backend"], output=model[2])
        result["wall_s"] = time.perf_counter() - start
        if len(ns) > 1:
            result["suffix"] = f"n{problem.q.shape[1]}"
        print_report(result, console=console)
        for path in write_outputs(result, args.out, command=command, plots=not args.no_plots):
            console.print(f"wrote {path}")
    return 0
