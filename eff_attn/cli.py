"""The ``eff-attn`` command line.

``eff-attn compare`` runs every method on an embedded default problem (or
the one you choose), checks each against float64 exact attention, prints a
table and writes JSON and PNG plots. ``eff-attn backends`` and
``eff-attn methods`` say what is available.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _csv(kind):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eff-attn", description="Efficient attention, taught and run.")
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser(
        "compare",
        help="compare every method against float64 exact attention",
        description="Run methods x budgets x backends on a problem; print a table, write JSON and plots. "
                    "With no options: every method once, at its default budget, on the embedded default problem "
                    "(clustered keys, N=2048, 8 heads, D=64, float32), with torch SDPA as the speed anchor. "
                    "Each method is judged against its own target: softmax, or dense entmax (entmax, "
                    "sparsefinder), or YOSO-E (yoso); every row also shows its error against softmax.",
    )
    compare.add_argument("--methods", type=_csv(str), default=None, help="comma-separated methods (default: all)")
    compare.add_argument("--backend", type=_csv(str), default=["auto"],
                         help="auto, all, or a comma-separated list of numpy,numba,cupy (default: auto)")
    compare.add_argument("--n", type=_csv(int), default=[2048], help="sequence lengths, e.g. 1024,4096 (default: 2048)")
    compare.add_argument("--problem", default="clustered",
                         help="input regime: clustered, gaussian, peaked or real (default: clustered); "
                              "or a heads file (.npz) written by eff_attn.capture")
    compare.add_argument("--heads", type=int, default=8, help="heads (default: 8)")
    compare.add_argument("--d", type=int, default=64, help="head dimension D (default: 64; real heads have D=32)")
    compare.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                         help="dtype the methods run in; errors are always against float64 references "
                              "(default: float32)")
    compare.add_argument("--causal", action="store_true", help="causal (bottom-right) attention")
    compare.add_argument("--budget", choices=["default", "all"], default="default",
                         help="each method at its default budget, or through its whole budget sweep "
                              "(default: default)")
    compare.add_argument("--sweep", action="store_const", const="all", dest="budget",
                         help="run every method's budget sweep (the same as --budget all; minutes, not seconds)")
    compare.add_argument("--seeds", type=int, default=2, help="seeds per randomised method (default: 2)")
    compare.add_argument("--repeats", type=int, default=5, help="warm timing repeats (default: 5)")
    compare.add_argument("--no-sdpa", action="store_true", help="do not time torch SDPA as the anchor")
    compare.add_argument("--compile-jobs", type=int, default=None,
                         help="processes that compile the Numba kernels before the timed run (default: the CPU "
                              "count; 1 compiles in each method's first call)")
    compare.add_argument("--out", type=Path, default=Path("compare-out"), help="output folder (default: compare-out)")
    compare.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    compare.add_argument("--target", type=float, default=None,
                         help="recommend the fastest method whose p90 error over the heads meets this target "
                              "(runs every budget sweep; see eff_attn.bench.recommend)")
    compare.add_argument("--model", default=None,
                         help="with --target, torch: module:factory returning (model, inputs); checks the "
                              "recommended method's effect on the model's outputs")

    sub.add_parser("backends", help="which backends can run here, and why not")
    sub.add_parser("methods", help="the registered methods and their budget parameter")
    return parser



def _compare(args) -> int:
    from rich.console import Console

    from . import registry
    from .bench import plots, report
    from .bench.runner import CompareConfig, _cpu_count, check_backends, run_compare

    if args.target is not None or args.model is not None:
        from .bench.recommend import run_from_cli

        return run_from_cli(args, defaults=build_parser().parse_args(["compare"]))
    console = Console()
    methods = args.methods or registry.method_names()
    for name in methods:
        registry.get_method(name)  # unknown names fail before any work
    check_backends(args.backend)  # so does a backend that cannot run here
    if args.problem == "real" and args.d != 32:
        args.d = 32
    config = CompareConfig(
        methods=methods, backends=args.backend, ns=args.n, problem=args.problem, heads=args.heads, d=args.d,
        dtype=args.dtype, causal=args.causal, budgets=args.budget, seeds=args.seeds, repeats=args.repeats,
        sdpa=not args.no_sdpa, compile_jobs=_cpu_count() if args.compile_jobs is None else args.compile_jobs,
    )
    with report.progress_bar(console) as bar:
        task = bar.add_task("compare", total=None)

        def progress(label, advance, total):
            bar.update(task, description=label, advance=advance, total=total)

        result = run_compare(config, progress=progress)
    report.print_table(result, console=console)
    command = "eff-attn " + " ".join(shlex.quote(a) for a in args.argv)
    path = report.write_json(result, args.out / "results.json", command=command)
    console.print(f"wrote {path}")
    if not args.no_plots:
        for p in plots.write_plots(result, args.out):
            console.print(f"wrote {p}")
    return 0


def _backends() -> int:
    from . import backends

    for name, entry in backends().items():
        mark = "yes" if entry["available"] else "no "
        print(f"{name:6s} {mark}  {entry['reason']}")
    return 0


def _methods() -> int:
    from . import registry

    for name in registry.method_names():
        m = registry.get_method(name)
        sweep = ", ".join(str(b.get(m.budget_name, b)) for b in m.sweep(2048)) if m.budget_name else "-"
        at = " at N = 2048" if callable(m.budgets) else ""
        print(f"{name:14s} {m.summary}  [{m.budget_name or 'no budget'}{at}: {sweep}]")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``eff-attn`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command == "compare":
            return _compare(args)
        if args.command == "backends":
            return _backends()
        return _methods()
    except (ValueError, TypeError) as exc:  # NotSupportedError included: a backend not installed, say
        print(f"eff-attn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
