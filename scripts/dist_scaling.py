"""Strong scaling of eff_attn.dist on a LocalCluster: the same problem on 1, 2, ... workers.

    python scripts/dist_scaling.py                       # writes benchmarks/dist/scaling-cpu.json
    python scripts/dist_scaling.py --workers 1,2,4 --repeats 5

Every worker is a process with one thread, and Numba runs single-threaded
(``NUMBA_NUM_THREADS=1``, set before anything imports Numba), so the worker count is
the number of cores in use. The baseline is the single-machine
``eff_attn.attention`` in this process, also on one thread. Two cases:

- ``heads``: exact attention, one task per head (batch/head sharding);
- ``key_blocks``: causal exact attention of one head, split into query and key
  blocks and merged by the online-softmax tree (key-block sharding).

Each time is the wall time of ``client.compute(out).result()`` after one warm-up
run (imports and Numba's cache load on each worker), min and median of
``--repeats`` runs. ``busy`` is the summed compute time of all tasks (from Dask's
task stream) over the wall time of the last run: how many tasks ran at once, on
average, whatever speed each got from a shared machine. ``cores`` is the CPU time
the worker processes used during the timed runs over their wall time: how many
cores the workers actually obtained (on a machine shared with other jobs, fewer than
the worker count).
"""

from __future__ import annotations

import os

if __name__ == "__main__":                                  # run as the benchmark, not imported for its table
    os.environ["NUMBA_NUM_THREADS"] = "1"                 # before numba is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

CASES = {
    # name: (batch, heads, N, q chunk, k chunk, head chunk, causal)
    "heads": (1, 8, 8192, 8192, 8192, 1, False),
    "key_blocks": (1, 1, 16384, 4096, 4096, 1, True),
}


def _process_cpu_seconds():
    """User + system CPU seconds of the calling process (run on every worker)."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def timed(fn, repeats):
    fn()                                                     # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--out", default="benchmarks/dist/scaling-cpu.json")
    args = parser.parse_args(argv)

    import dask.array as da
    from dask.distributed import Client, LocalCluster, get_task_stream

    import eff_attn
    import eff_attn.dist
    from eff_attn.testing import relative_error

    rows = []
    problems = {}
    for name, (B, H, N, qc, kc, hc, causal) in CASES.items():
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, H, N, 64)).astype(np.float32) for _ in range(3))
        problems[name] = (q, k, v, qc, kc, hc, causal)
        single = lambda: eff_attn.attention(q, k, v, causal=causal, backend=args.backend)  # noqa: E731
        best, median = timed(single, args.repeats)
        rows.append({"case": name, "workers": 0, "B": B, "H": H, "N": N, "q_chunk": qc, "k_chunk": kc,
                     "head_chunk": hc, "causal": causal, "tasks": 1, "min_s": best, "median_s": median})
        print(f"{name:10s} single machine, 1 thread: min {best:.2f} s, median {median:.2f} s", flush=True)

    for workers in (int(w) for w in args.workers.split(",")):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            for name, (q, k, v, qc, kc, hc, causal) in problems.items():
                # inputs already on the workers: scattered once, not embedded in the graph
                dq, dk, dv = (da.from_delayed(client.scatter(x), x.shape, dtype=x.dtype).rechunk((1, hc, c, 64))
                              for x, c in ((q, qc), (k, kc), (v, kc)))
                dq, dk, dv = client.persist([dq, dk, dv])
                out = eff_attn.dist.attention(dq, dk, dv, causal=causal, backend=args.backend)
                tasks = sum(1 for key in out.__dask_graph__() if "-part-" in str(key))
                result = {}

                def run():
                    with get_task_stream(client) as stream:
                        start = time.perf_counter()
                        result["out"] = client.compute(out).result()
                        result["wall"] = time.perf_counter() - start
                    result["busy"] = sum(stop - begin for task in stream.data
                                         for kind, begin, stop in ((s["action"], s["start"], s["stop"])
                                                                   for s in task["startstops"]) if kind == "compute")

                cpu_before = sum(client.run(_process_cpu_seconds).values())
                wall_before = time.perf_counter()
                best, median = timed(run, args.repeats)                  # 1 + repeats runs
                cpu = sum(client.run(_process_cpu_seconds).values()) - cpu_before
                cores = cpu / (time.perf_counter() - wall_before)
                cpu_per_run = cpu / (args.repeats + 1)
                busy = result["busy"] / result["wall"]
                err = relative_error(result["out"], eff_attn.attention(q, k, v, causal=causal, backend="numba"))
                B, H, N = q.shape[:3]
                rows.append({"case": name, "workers": workers, "B": B, "H": H, "N": N, "q_chunk": qc, "k_chunk": kc,
                             "head_chunk": hc, "causal": causal, "tasks": tasks, "min_s": best, "median_s": median,
                             "busy": busy, "cores": cores, "cpu_s_per_run": cpu_per_run, "max_rel_err": err})
                print(f"{name:10s} {workers} worker(s), {tasks} attention tasks: min {best:.2f} s, "
                      f"median {median:.2f} s, busy {busy:.2f}, cores {cores:.2f}, CPU {cpu_per_run:.2f} s/run, error vs single machine {err:.1e}", flush=True)

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "backend": args.backend, "dtype": "float32", "D": 64,
            "repeats": args.repeats}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}; load average {os.getloadavg()}\n")
    print(markdown_table(rows))


def markdown_table(rows):
    """The table of docs/distributed.md."""
    lines = ["| case | workers | attention tasks | wall min (s) | wall median (s) | busy | cores | worker CPU s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['case']}: H={r['H']}, N={r['N']}, blocks {r['q_chunk']}x{r['k_chunk']}" + (
            ", causal" if r["causal"] else "")
        if r["workers"] == 0:
            lines.append(f"| {shape} | single machine | - | {r['min_s']:.2f} | {r['median_s']:.2f} | - | - | - |")
        else:
            lines.append(f"| {shape} | {r['workers']} | {r['tasks']} | {r['min_s']:.2f} | {r['median_s']:.2f} | "
                         f"{r['busy']:.2f} | {r['cores']:.2f} | {r['cpu_s_per_run']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
