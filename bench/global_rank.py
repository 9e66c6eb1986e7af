"""Global rank allocation on AUSTEN-512: zero-sum (ZS-SVD), its correction stages, loss-aware
(SVD-LLM V2) against uniform ranks, all with whitening.

    python bench/global_rank.py                       # the full table (GPU: about 7 minutes on an H100)
    python bench/global_rank.py --calib-windows 16 --calib-seqlen 256 --grad-seqlen 1024 \\
        --eval-windows 8 --ratios 0.2 0.4 --variants whitening zero-sum --name global-cpu-small

Each (variant, ratio) runs in a fresh subprocess of bench/austen512.py (its recipe is a YAML file
written to bench/work/recipes/), so its peak memory is its own. The gradients of zero-sum are
1 x 2048 tokens drawn from the calibration text with seed 3 (the harness's gradient windows).

Variants:
    whitening        uniform ranks (SVD-LLM), the baseline
    zero-sum         ZS-SVD one shot (keep_rank_ratio 0.3 at ratio >= 0.6, else 0, as published)
    zero-sum-6       ZS-SVD with 6 planning stages (5 corrections), the published multi-stage setting
    loss-aware       SVD-LLM V2's heterogeneous allocation
    zero-sum-plain   zero-sum without the lean gradient path (only at --lean-ratio): peak memory
    fwsvd, fwsvd+whitening   (optional) Fisher-weighted SVD, uniform ranks; its row Fisher comes
                     from a gradient pass over the calibration windows (one window per batch)

Writes bench/results/<name>.{json,md,png} and <name>-ranks.png (zero-sum's ranks per block and
matrix type at --plot-ratio).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import austen512

RECIPES = HERE / "work" / "recipes"
VARIANTS = ("whitening", "zero-sum", "zero-sum-6", "loss-aware")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def zero_sum_settings(ratio: float, **extra) -> dict:
    return {"keep_rank_ratio": 0.3 if ratio >= 0.6 else 0.0, **extra}


def allocator_for(variant: str, ratio: float) -> dict | str:
    if variant in ("whitening", "fwsvd", "fwsvd+whitening"):
        return "uniform"
    if variant == "zero-sum":
        return {"zero-sum": zero_sum_settings(ratio)}
    if variant == "zero-sum-6":
        return {"zero-sum": zero_sum_settings(ratio, stages=6)}
    if variant == "zero-sum-plain":
        return {"zero-sum": zero_sum_settings(ratio, lean=False)}
    if variant == "loss-aware":
        return {"loss-aware": {}}
    if variant == "loss-aware-relative":
        return {"loss-aware": {"loss_scale": "relative"}}
    raise SystemExit(f"unknown variant {variant!r}")


def recipe_file(variant: str, ratio: float) -> Path:
    import yaml

    RECIPES.mkdir(parents=True, exist_ok=True)
    path = RECIPES / f"{variant}-{ratio:.2f}.yaml"
    scalings = variant.split("+") if variant.startswith("fwsvd") else ["whitening"]
    data = {"lowrank_recipe": 1, "name": variant, "scalings": scalings,
            "allocator": allocator_for(variant, ratio), "ratio": ratio, "seed": austen512.PROTOCOL["seed"]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def gradient_peak_mb(notes: list[str]) -> float | None:
    peaks = [float(m.group(1)) for n in notes for m in [re.search(r"gradient pass \(scores.*peak GPU (\d+) MiB", n)] if m]
    return max(peaks) if peaks else None


def run(variant: str, ratio: float, args) -> dict | None:
    spec = "dense" if variant == "dense" else str(recipe_file(variant, ratio))
    cmd = [sys.executable, str(HERE / "austen512.py"), "--model", args.model, "--device", args.device,
           "--calib-windows", str(args.calib_windows), "--calib-seqlen", str(args.calib_seqlen),
           "--eval-windows", str(args.eval_windows), "--grad-windows", str(args.grad_windows),
           "--grad-seqlen", str(args.grad_seqlen), "--one", spec, str(ratio)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(f"{variant} @ {ratio}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    row = json.loads(line[0][7:])
    row.update(variant=variant, wall_seconds=time.perf_counter() - t0,
               gradient_gpu_peak_mb=gradient_peak_mb(row.get("notes", [])),
               lean=None if not variant.startswith("zero-sum") else variant != "zero-sum-plain")
    return row


def estimate(variant: str, rows: list[dict]) -> float | None:
    """Wall seconds of a job, from the finished ones (a correction stage costs about one more
    profiling pass, i.e. what one-shot zero-sum costs beyond uniform)."""
    def walls(v: str) -> list[float]:
        return [r["wall_seconds"] for r in rows if r["variant"] == v and "wall_seconds" in r]

    if walls(variant):
        return max(walls(variant))
    one_shot, base = walls("zero-sum") + walls("zero-sum-plain"), walls("whitening")
    if variant == "zero-sum-6" and one_shot:
        zs = max(one_shot)
        return zs + 5 * max(zs - (max(base) if base else 0.0), 0.25 * zs)
    if one_shot:
        return max(one_shot)
    return 2 * max(base) if base else None


def table(rows: list[dict], info: dict, protocol: dict, name: str) -> str:
    uniform = {r["ratio"]: r["perplexity"] for r in rows if r["variant"] == "whitening"}
    dense = [r for r in rows if r["variant"] == "dense"]
    lines = [f"# AUSTEN-512: {name} (global rank allocation)", "",
             f"Machine: {info.get('gpu', 'no GPU')}; {info['cpu']} ({info['cores']} cores, {info['memory_gb']} GB); "
             f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}.",
             f"Protocol: SmolLM2-135M float32; calibration {protocol['calib_windows']}x{protocol.get('calib_seqlen', protocol['seqlen'])} "
             f"from {protocol['calib_text']} (seed {protocol['seed']}); gradients {protocol['grad_windows']}x{protocol['grad_seqlen']} "
             f"from {protocol['calib_text']} (seed {protocol['seed']}); evaluation first {protocol['eval_windows']} windows of "
             f"{protocol['seqlen']} from {protocol['eval_text']}. Every variant but fwsvd uses whitening.",
             (f"Dense perplexity {dense[0]['perplexity']:.3f}." if dense else ""),
             "",
             "`achieved` is the fraction of the targeted parameters removed (uniform ranks floor every matrix, so "
             "they overshoot); `vs uniform` is the perplexity change against uniform whitening at the same ratio; "
             "`dense` counts matrices left dense. Times in seconds without model load and evaluation (planning = "
             "profiling passes + gradient passes + allocation + corrections). Memory: `GPU peak` is "
             "torch.cuda.max_memory_allocated during compression, `grad GPU peak` the peak of the scoring "
             "gradient pass alone, `RSS peak` the highest resident memory sampled during compression.",
             "",
             "| variant | ratio | achieved | perplexity | vs uniform | dense | compress s | planning s | gradients s | GPU peak MiB | grad GPU peak MiB | RSS peak MiB | gradient path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == "dense":
            continue
        t = r.get("timings", {})
        base = uniform.get(r["ratio"])
        vs = ""
        if base and r["variant"] != "whitening":
            q = r["perplexity"] / base
            vs = f"{100 * (q - 1):+.1f}%" if q < 10 else f"x{q:.3g}"
        gpu = f"{r['compress_gpu_peak_mb']:.0f}" if r.get("compress_gpu_peak_mb") else "-"
        ggpu = f"{r['gradient_gpu_peak_mb']:.0f}" if r.get("gradient_gpu_peak_mb") else "-"
        path = "" if r.get("lean") is None else ("lean (hook)" if r["lean"] else "plain (held)")
        lines.append(
            f"| {r['variant']} | {r['ratio']:.2f} | {r.get('ratio_achieved', 0):.4f} | {r['perplexity']:.3f} | {vs} | "
            f"{r.get('dense_matrices', '')} | {t.get('total', 0):.1f} | {t.get('planning', 0):.1f} | "
            f"{t.get('gradients', 0):.1f} | {gpu} | {ggpu} | {r.get('compress_rss_peak_mb', 0):.0f} | {path} |")
    staged = [r for r in rows if r["variant"] == "zero-sum-6"]
    if staged:
        notes = [n for n in staged[0].get("notes", []) if "correction" in n]
        lines += ["", f"Corrections of zero-sum-6 at {staged[0]['ratio']:.2f} (calibration-loss of the correction batch "
                      "before and after each projection step): " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def plot_ranks(row: dict, path: Path) -> None:
    """Kept rank per block (rows) and matrix type (columns); colour = rank / break-even rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = 1 + max(b for _, b, _, _ in row["ranks"])
    types = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _, _, _ in row["ranks"]))
    types = [t for t in TYPES if t in types] + [t for t in types if t not in TYPES]
    frac = np.full((blocks, len(types)), np.nan)
    text = [["" for _ in types] for _ in range(blocks)]
    for name, block, rank, (m, n) in row["ranks"]:
        j = types.index(name.rsplit(".", 1)[-1])
        r_star = (m * n - 1) // (m + n)
        frac[block, j] = 1.0 if rank is None else rank / r_star
        text[block][j] = "D" if rank is None else str(rank)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(types), 0.9 + 0.26 * blocks))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for b in range(blocks):
        for j in range(len(types)):
            ax.text(j, b, text[b][j], ha="center", va="center", fontsize=6,
                    color="black" if frac[b, j] > 0.6 else "white")
    ax.set_xticks(range(len(types)), [t.replace("_proj", "") for t in types])
    ax.set_yticks(range(blocks), [str(b) for b in range(blocks)], fontsize=6)
    ax.set_ylabel("block")
    ax.set_title(f"{row['variant']} @ {row['ratio']:.2f}: kept rank (D = dense)\n"
                 f"achieved {row['ratio_achieved']:.4f}, {row['dense_matrices']} dense, ppl {row['perplexity']:.2f}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="rank / break-even rank", shrink=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write(rows: list[dict], info: dict, protocol: dict, args) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"protocol": protocol, "machine": info, "note": args.note,
                                                        "rows": rows}, indent=2))
    text = table(rows, info, protocol, args.name)
    if args.note:
        text = text.replace("\n\n", f"\n\n{args.note}\n\n", 1)
    (out / f"{args.name}.md").write_text(text)
    austen512.plot([{**r, "recipe": r["variant"]} for r in rows if r["variant"] != "zero-sum-plain"],
                   out / f"{args.name}.png", args.name,
                   f"perplexity (prideprejudice, {protocol['eval_windows']} x {protocol['seqlen']})")
    for r in rows:
        if r["variant"] == "zero-sum" and abs(r["ratio"] - args.plot_ratio) < 1e-9:
            plot_ranks(r, out / f"{args.name}-ranks.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--lean-ratio", type=float, default=0.4,
                   help="ratio of the zero-sum-plain row (memory without the lean path); negative: none")
    p.add_argument("--plot-ratio", type=float, default=0.4)
    p.add_argument("--name", default="global")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--calib-windows", type=int, default=austen512.PROTOCOL["calib_windows"])
    p.add_argument("--calib-seqlen", type=int, default=austen512.PROTOCOL["seqlen"])
    p.add_argument("--eval-windows", type=int, default=austen512.PROTOCOL["eval_windows"])
    p.add_argument("--grad-windows", type=int, default=austen512.PROTOCOL["grad_windows"])
    p.add_argument("--grad-seqlen", type=int, default=austen512.PROTOCOL["grad_seqlen"])
    p.add_argument("--dry-run", action="store_true", help="list the jobs and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite <name>.md/.png from <name>.json and exit")
    p.add_argument("--note", default=None, help="a line for the results file (e.g. about the machine's load)")
    p.add_argument("--resume", action="store_true", help="keep the rows of <name>.json (same protocol), run the rest")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds: skip a job that would likely end after this (estimated from the finished "
                        "ones); jobs run in priority order: baseline, one-shot methods, corrections, memory")
    args = p.parse_args()
    protocol = {**austen512.PROTOCOL, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
                "grad_windows": args.grad_windows, "grad_seqlen": args.grad_seqlen, "calib_seqlen": args.calib_seqlen}
    jobs = [] if args.no_dense else [("dense", 0.0)]
    # priority order (a --deadline drops the tail): baseline and one-shot zero-sum at every ratio,
    # the correction at the first ratio, loss-aware, the plain-gradient memory row, the other corrections
    for variant in ("whitening", "zero-sum"):
        if variant in args.variants:
            jobs += [(variant, ratio) for ratio in args.ratios]
    corrections = [("zero-sum-6", ratio) for ratio in args.ratios] if "zero-sum-6" in args.variants else []
    jobs += corrections[:1]
    for variant in [v for v in args.variants if v not in ("whitening", "zero-sum", "zero-sum-6")]:
        jobs += [(variant, ratio) for ratio in args.ratios]
    if args.lean_ratio >= 0 and any(v.startswith("zero-sum") for v in args.variants):
        jobs.append(("zero-sum-plain", args.lean_ratio))
    jobs += corrections[1:]
    if args.report_only:
        saved = json.loads((HERE / "results" / f"{args.name}.json").read_text())
        args.note = args.note or saved.get("note")
        write(saved["rows"], saved["machine"], saved["protocol"], args)
        return
    if args.dry_run:
        print("\n".join(f"{v} @ {r:.2f}" for v, r in jobs))
        return
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    info = austen512.machine()
    rows: list[dict] = []
    if args.resume and (out / f"{args.name}.json").exists():
        old = json.loads((out / f"{args.name}.json").read_text())
        if old.get("protocol") == protocol:
            rows = old["rows"]
            args.note = args.note or old.get("note")
    done = {(r["variant"], round(r["ratio"], 6)) for r in rows}
    jobs = [j for j in jobs if (j[0], round(j[1], 6)) not in done]
    skipped: list[str] = []
    started = time.perf_counter()
    for i, (variant, ratio) in enumerate(jobs):
        guess = estimate(variant, rows)
        if args.deadline and guess is not None and time.perf_counter() - started + guess > args.deadline:
            skipped.append(f"{variant} @ {ratio:.2f}")
            print(f"skipping {variant} @ {ratio:.2f}: about {guess:.0f}s would pass the deadline", flush=True)
            continue
        row = run(variant, ratio, args)
        if row is None:
            continue
        rows.append(row)
        t = row.get("timings", {}).get("total", 0.0)
        print(f"[{i + 1}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {variant:>16} @ {ratio:.2f}: "
              f"ppl {row['perplexity']:.3f} achieved {row.get('ratio_achieved', 0):.4f} "
              f"dense {row.get('dense_matrices', '-')} compress {t:.1f}s", flush=True)
        write(rows, info, protocol, args)
    if skipped:
        with open(out / f"{args.name}.md", "a") as f:
            f.write(f"\nSkipped to meet the deadline of {args.deadline:.0f}s: {', '.join(skipped)}.\n")
    print(f"done in {time.perf_counter() - started:.0f}s: {out / (args.name + '.md')}")


if __name__ == "__main__":
    main()
