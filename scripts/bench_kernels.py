"""Time the Numba exact-attention kernels against torch's fused CPU SDPA, and every method's
Numba path against its NumPy reference.

    python scripts/bench_kernels.py                      # both tables, writes benchmarks/cpu/kernels/results.json
    python scripts/bench_kernels.py --sizes 4096 --repeats 3 --no-methods --out /tmp/k.json
    python scripts/bench_kernels.py --publish            # results.json -> docs/methods/exact.md's tables

**Exact vs SDPA.** float32, B = 1, H = 8, D = 64, N in ``--sizes``: forward, causal
forward, and forward plus backward. eff_attn is called as ``attention(q, k, v,
method="exact", backend="numba")`` on (1, 8, N, 64) NumPy arrays (and
``attention_vjp`` then ``vjp(dout)``); torch as its users call it, with 4-D
(B, H, N, D) tensors: ``scaled_dot_product_attention`` under ``torch.no_grad`` for
the forward, and autograd (``out.backward(dout)``) for forward plus backward. Both
run on the same threads: ``torch.set_num_threads(T)`` and ``numba.set_num_threads(T)``
with T = ``--threads`` (default: every core). The two implementations'
repetitions are interleaved (ours, torch, ours, torch, ...) so that load from other
processes hits both alike; each cell reports the median and the best wall time, and
the median process CPU time (steadier than wall time on a shared machine; it also
counts threads spinning while they wait, which both runtimes do).

GFLOP/s use the analytic count of :func:`eff_attn.methods.exact.flops` (the same
count for both). The fraction of peak divides by ``cores x GHz x FLOP/cycle``:
GHz is the CPU's nominal clock (``lscpu``'s max MHz if given, else the TSC clock,
BogoMIPS / 2), and FLOP/cycle per core is 2 FMA pipes x 2 FLOP x the float32 lanes of
the widest vector unit (16 with AVX-512, 8 with AVX2/FMA), i.e. 64 or 32.

**Per method.** Every registered method with a Numba backend (or those named in
``--methods``), its default parameters, float32, 8 heads, D = 64, N = ``--method-n``
(4096): warm median of Numba and of NumPy (forward only), the speed-up, and both
sides' rate in GFLOP/s from the method's analytic ``flops``. Beside them, the
machine's BLAS rate on the same threads: an (N, 512) x (512, 512) float32 product
into a preallocated output, through NumPy (compute-bound). A NumPy reference that
already runs at a large fraction of that rate is bound by its matrix products,
which no kernel makes several times faster; the table says so with the fraction.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eff_attn  # noqa: E402
from eff_attn import registry  # noqa: E402
from eff_attn.bench.runner import environment  # noqa: E402
from eff_attn.methods.exact import flops as exact_flops  # noqa: E402

OUT = ROOT / "benchmarks" / "cpu" / "kernels" / "results.json"
PAGE = ROOT / "docs" / "methods" / "exact.md"
BLOCK = re.compile(r"(<!-- BEGIN kernels -->\n).*?(<!-- END kernels -->)", re.S)
CASE_NAMES = {"forward": "forward", "causal": "causal forward", "forward_backward": "forward + backward"}
HEADS, D = 8, 64
CASES = ("forward", "causal", "forward_backward")
BLAS_K = 512                                                               # the BLAS-rate product: (N, 512) x (512, 512)


def cpu_peak() -> dict:
    """Nominal float32 peak of this CPU from ``lscpu``, with the assumption spelled out."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    field = dict(re.findall(r"^([^:\n]+):\s*(.*)$", text, re.M))
    flags = set(field.get("Flags", "").split())
    cores = int(field.get("Core(s) per socket", "1")) * int(field.get("Socket(s)", "1"))
    if "CPU max MHz" in field:
        ghz, clock = float(field["CPU max MHz"]) / 1e3, "lscpu CPU max MHz"
    else:
        ghz, clock = float(field.get("BogoMIPS", "0")) / 2e3, "TSC clock (BogoMIPS / 2)"
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    flop_per_cycle = 2 * 2 * lanes
    return {
        "cores": cores, "ghz": ghz, "clock_source": clock, "vector": {16: "AVX-512", 8: "AVX2+FMA"}.get(lanes, "SSE"),
        "flop_per_cycle_per_core": flop_per_cycle, "gflops": cores * ghz * flop_per_cycle,
        "assumption": f"{cores} cores x {ghz:.3f} GHz ({clock}) x {flop_per_cycle} float32 FLOP/cycle "
                      f"(2 FMA pipes x 2 FLOP x {lanes} lanes)",
    }


def _interleaved(fns: dict, repeats: int) -> dict:
    """Warm each callable once, then time them in turn ``repeats`` times; median and best in seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"median_s": statistics.median(t), "best_s": min(t), "all_s": t,
                   "cpu_median_s": statistics.median(cpu[name]), "cpu_best_s": min(cpu[name])} for name, t in times.items()}


def exact_vs_sdpa(sizes, repeats: int, peak: float, rows: list, save) -> None:
    import torch
    import torch.nn.functional as F

    for N in sizes:
        rng = np.random.default_rng(N)
        q, k, v, dout = (rng.standard_normal((1, HEADS, N, D), dtype=np.float32) for _ in range(4))
        tq, tk, tv, tdo = (torch.from_numpy(a) for a in (q, k, v, dout))
        gq, gk, gv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))

        def ours_forward(causal=False):
            eff_attn.attention(q, k, v, method="exact", backend="numba", causal=causal)

        def ours_backward():
            _, vjp = eff_attn.attention_vjp(q, k, v, method="exact", backend="numba")
            vjp(dout)

        def torch_forward(causal=False):
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

        def torch_backward():
            for t in (gq, gk, gv):
                t.grad = None
            F.scaled_dot_product_attention(gq, gk, gv).backward(tdo)

        pairs = {
            "forward": (ours_forward, torch_forward),
            "causal": (lambda: ours_forward(True), lambda: torch_forward(True)),
            "forward_backward": (ours_backward, torch_backward),
        }
        for case, (ours, theirs) in pairs.items():
            t = _interleaved({"eff_attn": ours, "sdpa": theirs}, repeats)
            fl = exact_flops(N, N, D, batch=HEADS, causal=case == "causal", backward=case == "forward_backward")
            row = {"n": N, "case": case, "gflop": fl / 1e9}
            for impl in ("eff_attn", "sdpa"):
                med = t[impl]["median_s"]
                row[impl] = {**t[impl], "median_ms": med * 1e3, "gflops": fl / med / 1e9,
                             "peak_fraction": fl / med / 1e9 / peak}
            row["ratio_median"] = t["eff_attn"]["median_s"] / t["sdpa"]["median_s"]
            row["ratio_best"] = t["eff_attn"]["best_s"] / t["sdpa"]["best_s"]
            row["ratio_cpu"] = t["eff_attn"]["cpu_median_s"] / t["sdpa"]["cpu_median_s"]
            rows.append(row)
            save()
            print(f"N={N:5d} {case:16s} ours {row['eff_attn']['median_ms']:8.1f} ms  sdpa "
                  f"{row['sdpa']['median_ms']:8.1f} ms  ratio {row['ratio_median']:.2f} (best {row['ratio_best']:.2f}, "
                  f"CPU time {row['ratio_cpu']:.2f})  "
                  f"{row['eff_attn']['gflops']:.0f} vs {row['sdpa']['gflops']:.0f} GFLOP/s", flush=True)
    return rows


def blas_rate(N: int, repeats: int) -> float:
    """GFLOP/s of NumPy's BLAS on an (N, 512) x (512, 512) float32 product into a preallocated output, best of ``repeats``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((N, BLAS_K), dtype=np.float32)                 # (N, 512)
    b = rng.standard_normal((BLAS_K, BLAS_K), dtype=np.float32)            # (512, 512)
    c = np.empty((N, BLAS_K), dtype=np.float32)                            # (N, 512)
    t = _interleaved({"matmul": lambda: np.matmul(a, b, out=c)}, repeats)["matmul"]["best_s"]
    return 2 * N * BLAS_K * BLAS_K / t / 1e9


def methods_numba_vs_numpy(N: int, repeats: int, rows: list, save, names=None, blas_gflops=None) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, N, D), dtype=np.float32) for _ in range(3))
    for name in names or registry.method_names(builtin_only=True):
        method = registry.get_method(name)
        if method.impl("numba") is None:
            continue
        extra = dict(method.compare_defaults)                              # e.g. Sparsefinder's state="fit"
        fns = {b: (lambda b=b: eff_attn.attention(q, k, v, method=name, backend=b, rng=0, **extra))
               for b in ("numba", "numpy")}
        t = _interleaved(fns, repeats)
        gflop = method.flops(N, N, D, batch=HEADS) / 1e9
        row = {"method": name, "n": N, "gflop": gflop, "numba_ms": t["numba"]["median_s"] * 1e3,
               "numpy_ms": t["numpy"]["median_s"] * 1e3}
        row["speedup"] = row["numpy_ms"] / row["numba_ms"]
        row["numba_gflops"] = gflop / t["numba"]["median_s"]
        row["numpy_gflops"] = gflop / t["numpy"]["median_s"]
        if blas_gflops:
            row["numpy_blas_fraction"] = row["numpy_gflops"] / blas_gflops
        rows.append(row)
        save()
        print(f"{name:16s} numba {row['numba_ms']:9.1f} ms  numpy {row['numpy_ms']:9.1f} ms  "
              f"x{row['speedup']:.1f}  ({row['numba_gflops']:.1f} vs {row['numpy_gflops']:.1f} GFLOP/s)", flush=True)
    return rows


def render(result: dict) -> str:
    """The Markdown tables of a results file."""
    meta, env = result["meta"], result["meta"]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines = [f"*{env.get('cpu', '?')}, {meta['threads']} threads for both; {versions}; {env.get('date', '')}. "
             f"Peak {meta['peak']['gflops']:.0f} GFLOP/s = {meta['peak']['assumption']}. "
             f"`{meta['command']}`*", ""]
    if meta.get("machine_note"):
        lines[0:0] = [f"**{meta['machine_note']}**", ""]
    if result["exact_vs_sdpa"]:
        lines += ["| N | case | eff_attn (ms) | SDPA (ms) | ratio | ratio (CPU time) | eff_attn GFLOP/s | SDPA GFLOP/s "
                  "| eff_attn % of peak | SDPA % of peak |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["exact_vs_sdpa"]:
            ours, theirs = row["eff_attn"], row["sdpa"]
            lines.append(f"| {row['n']} | {CASE_NAMES[row['case']]} | {ours['median_ms']:.1f} | {theirs['median_ms']:.1f} "
                         f"| {row['ratio_median']:.2f} | {row['ratio_cpu']:.2f} | {ours['gflops']:.0f} "
                         f"| {theirs['gflops']:.0f} | {100 * ours['peak_fraction']:.0f}% | {100 * theirs['peak_fraction']:.0f}% |")
        lines.append("")
    if result["methods"]:
        n = result["methods"][0]["n"]
        blas = meta.get("blas_gflops")
        lines += [f"| method (N = {n}, defaults) | Numba (ms) | NumPy (ms) | speed-up | Numba GFLOP/s | NumPy GFLOP/s "
                  f"| NumPy / BLAS rate |", "|---|---|---|---|---|---|---|"]
        for row in result["methods"]:
            gf = (f"{row['numba_gflops']:.1f} | {row['numpy_gflops']:.1f} | "
                  f"{100 * row['numpy_blas_fraction']:.0f}%" if "numpy_blas_fraction" in row else "- | - | -")
            lines.append(f"| {row['method']} | {row['numba_ms']:.1f} | {row['numpy_ms']:.1f} | {row['speedup']:.1f}x | {gf} |")
        if blas:
            lines.append("")
            lines.append(f"*BLAS rate: {blas:.0f} GFLOP/s, NumPy's (N, 512) x (512, 512) float32 product on the same "
                         f"threads. GFLOP/s use each method's analytic count (its docs page).*")
        lines.append("")
    return "\n".join(lines)


def publish(path: Path = OUT, page: Path = PAGE) -> None:
    """Rewrite the block between ``<!-- BEGIN kernels -->`` and ``<!-- END kernels -->`` of the exact page."""
    text = page.read_text()
    body = render(json.loads(path.read_text()))
    new, count = BLOCK.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    if count != 1:
        raise SystemExit(f"{page} needs exactly one kernels block, found {count}")
    page.write_text(new)
    print(f"updated {page}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: every core)")
    ap.add_argument("--method-n", type=int, default=4096)
    ap.add_argument("--method-repeats", type=int, default=3)
    ap.add_argument("--no-methods", action="store_true", help="skip the per-method Numba/NumPy table")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods in the per-method table")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact vs SDPA table")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--publish", action="store_true", help="only render --out into docs/methods/exact.md")
    ap.add_argument("--machine-note", default="", help="a caveat printed above the tables (e.g. a shared machine)")
    args = ap.parse_args(argv)
    if args.publish:
        publish(args.out)
        return

    import numba
    import torch

    peak = cpu_peak()
    threads = args.threads or peak["cores"]
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    print(f"peak {peak['gflops']:.0f} GFLOP/s: {peak['assumption']}; {threads} threads", flush=True)
    result = {
        "meta": {
            "environment": environment(), "peak": peak, "threads": threads, "dtype": "float32",
            "shape": f"(1, {HEADS}, N, {D})", "repeats": args.repeats,
            "command": "python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "note": "medians of interleaved repetitions; ratio = eff_attn / sdpa (below 1: eff_attn faster)",
            "machine_note": args.machine_note,
        },
        "exact_vs_sdpa": [],
        "methods": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():                                                            # after every row: a partial run keeps its rows
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    if not args.no_exact:
        exact_vs_sdpa(args.sizes, args.repeats, peak["gflops"], result["exact_vs_sdpa"], save)
    if not args.no_methods:
        result["meta"]["blas_gflops"] = blas_rate(args.method_n, args.method_repeats)
        print(f"BLAS rate {result['meta']['blas_gflops']:.0f} GFLOP/s", flush=True)
        methods_numba_vs_numpy(args.method_n, args.method_repeats, result["methods"], save, args.methods,
                               result["meta"]["blas_gflops"])
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
