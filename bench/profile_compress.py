"""Where a compression's time goes: cProfile of one run, per phase, per matrix shape and per function.

    python bench/profile_compress.py --windows 2 --name profile-cpu      # both factorizations

SmolLM2-135M, whitening + uniform at --ratio (0.4), original inputs, --windows calibration windows
of 512 tokens from emma (seed 3; few windows, so the forward pass is small and the factorization,
which does not grow with the tokens, stands out). One run per factorization (``auto``, the default,
and ``svd``, LAPACK's float64 SVD of every matrix: the reference), each in a fresh subprocess.
Writes bench/results/<name>.{md,json}: the phases of the report, the seconds per matrix shape, and
the functions with the most own time (cProfile's tottime).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import austen512  # noqa: E402

RESULTS = HERE / "results"
TOP = 15


def run_one(factorization: str, windows: int, ratio: float) -> dict:
    import torch

    import lowrank
    from lowrank.data import load_model

    model, tokenizer = load_model("smollm2-135m")
    protocol = {**austen512.PROTOCOL, "calib_windows": windows, "eval_windows": 1}
    calib, _ = austen512.windows("smollm2-135m", tokenizer, protocol)
    recipe = lowrank.Recipe(scalings=["whitening"], allocator="uniform", ratio=ratio, inputs="original",
                            factorization=factorization)
    profiler = cProfile.Profile()
    profiler.enable()
    report = lowrank.compress(model, recipe, calib, batch_size=8, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    functions = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = name if path == "~" else f"{Path(path).name}:{line}({name})"
        functions.append({"function": where, "calls": calls, "own_s": own, "cumulative_s": cumulative})
    functions.sort(key=lambda f: -f["own_s"])
    shapes: dict[str, dict] = {}
    for m in report.matrices:
        key = f"{m.shape[0]}x{m.shape[1]}"
        s = shapes.setdefault(key, {"count": 0, "seconds": 0.0})
        s["count"] += 1
        s["seconds"] += m.factorization_seconds
    return {"factorization": factorization, "windows": windows, "ratio": ratio, "timings": report.timings,
            "threads": torch.get_num_threads(), "per_shape": shapes, "functions": functions[:TOP],
            "methods": sorted({m.factorization for m in report.matrices})}


def write(name: str, data: dict) -> None:
    m = data["machine"]
    lines = [f"# Where a compression's time goes: {name}", "",
             f"Machine: {m.get('gpu', 'no GPU')}; {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB); torch {m['torch']}.",
             "SmolLM2-135M, whitening + uniform, original inputs; cProfile around `lowrank.compress` "
             "(`python bench/profile_compress.py`). `auto` is the default factorization, `svd` the float64 "
             "LAPACK reference (what every SVD cost before issue 9).", ""]
    runs = data["runs"]
    phases = sorted({p for r in runs for p in r["timings"]}, key=lambda p: (p == "total", p))
    lines += ["| factorization | windows | ratio | threads | " + " | ".join(phases) + " |",
              "|---|---|---|---|" + "---|" * len(phases)]
    for r in runs:
        lines.append(f"| {r['factorization']} | {r['windows']} | {r['ratio']} | {r['threads']} | "
                     + " | ".join(f"{r['timings'].get(p, 0.0):.1f}" for p in phases) + " |")
    lines += ["", "Seconds per matrix (its SVD and factors), by shape:", "",
              "| shape | count | " + " | ".join(r["factorization"] for r in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    for shape in sorted({s for r in runs for s in r["per_shape"]}):
        count = runs[0]["per_shape"].get(shape, {}).get("count", 0)
        cells = [f"{r['per_shape'][shape]['seconds'] / r['per_shape'][shape]['count']:.3f}"
                 if shape in r["per_shape"] else "" for r in runs]
        lines.append(f"| {shape} | {count} | " + " | ".join(cells) + " |")
    for r in runs:
        lines += ["", f"## Most own time, factorization `{r['factorization']}`", "",
                  "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
        for f in r["functions"]:
            lines.append(f"| `{f['function']}` | {f['calls']} | {f['own_s']:.2f} | {f['cumulative_s']:.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--factorizations", nargs="+", default=["auto", "svd"])
    p.add_argument("--name", default="profile-cpu")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), float(a.one[2]))))
        return
    runs = []
    for fac in a.factorizations:
        out = subprocess.run([sys.executable, __file__, "--one", fac, str(a.windows), str(a.ratio)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{fac} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{fac}: {runs[-1]['timings']}", flush=True)
    data = {"machine": austen512.machine(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(data, indent=2))
    write(a.name, data)


if __name__ == "__main__":
    main()
