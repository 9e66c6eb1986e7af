"""SoCo (learned singular spectrum) against whitening + zero-sum (one shot), AUSTEN-512 reduced for a CPU.

    python bench/soco.py                                  # the CPU reduced setting (default)
    python bench/soco.py --variants zero-sum soco --ratios 0.4
    python bench/soco.py --report-only                    # rewrite the tables from the cached rows

Reduced setting (2 CPU cores): SmolLM2-135M float32; calibration 16 x 256 tokens from `emma`
(seed 3) for the whitening statistics and SoCo's training; zero-sum's gradients 1 x 1024 from
`emma` (seed 3); evaluation the first 8 windows of 512 of `prideprejudice` and of `persuasion` (a
novel no calibration saw). The same as `bench/results/global-cpu-small.md` for the baselines.

Each (variant, ratio) runs in a fresh subprocess (its peak memory is its own); finished rows are
cached in bench/work/soco-rows.json, so an interrupted run resumes. Writes
bench/results/<name>.{md,json} and <name>-importance.png (learned importance against
singular-value order for a few matrices, from the SoCo record of --plot-ratio).

Variants (all after whitening):
    zero-sum       ZS-SVD one shot (keep_rank_ratio 0.3 at 0.6, as published)
    soco           SoCo, all three stages (reduced step counts)
    soco-s1        ablation: stage 1 only, then the hard mask (no stage 2 / 3)
    soco-s12       ablation: stages 1 and 2, no compensation stage
    soco-noamp     ablation: stage 3 without amplification (scales clipped at 1)
    soco-sv        ablation: the learned mask sizes, but each matrix keeps its largest singular
                   values (spectral order), then stage 3 as in soco
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import austen512  # noqa: E402

from lowrank_builtin.soco import CPU  # noqa: E402

WORK = HERE / "work"
ROWS = WORK / "soco-rows.json"
PROTOCOL = {"model": "smollm2-135m", "calib_text": "austen:emma", "calib_windows": 16, "calib_seqlen": 256,
            "seed": 3, "grad_windows": 1, "grad_seqlen": 1024, "eval_windows": 8, "eval_seqlen": 512,
            "eval_texts": ["austen:prideprejudice", "austen:persuasion"]}
#: SoCo's CPU-sized schedule: the allocator's own default off CUDA, written out so the results record it.
SOCO_CPU = {**CPU, "steps": list(CPU["steps"])}
VARIANTS = ("zero-sum", "soco", "soco-s1", "soco-s12", "soco-noamp", "soco-sv", "soco-uniform")


def allocator_for(variant: str, ratio: float, record: Path | None) -> dict:
    """The allocator spec of a variant (a recipe's ``allocator:`` entry)."""
    if variant == "zero-sum":
        return {"zero-sum": {"keep_rank_ratio": 0.3 if ratio >= 0.6 else 0.0, "gradient_seqlen": PROTOCOL["grad_seqlen"]}}
    settings: dict = dict(SOCO_CPU, progress=True)
    if record is not None:
        settings["record"] = str(record)
    steps = list(SOCO_CPU["steps"])
    if variant == "soco-s1":
        settings["steps"] = [steps[0], 0, 0]
    elif variant == "soco-s12":
        settings["steps"] = [steps[0], steps[1], 0]
    elif variant == "soco-noamp":
        settings["amplify"] = False
    elif variant == "soco-sv":
        settings["order"] = "spectral"
    elif variant == "soco-uniform":
        settings["init"] = "uniform"
    elif variant != "soco":
        raise SystemExit(f"unknown variant {variant!r}")
    return {"soco": settings}


def run_one(variant: str, ratio: float) -> dict:
    """One configuration in this process: load, compress (timed, peak RSS sampled), evaluate."""
    import torch

    import lowrank
    from lowrank.data import load_model, load_windows, perplexity

    torch.manual_seed(PROTOCOL["seed"])
    model, tokenizer = load_model(PROTOCOL["model"], dtype=torch.float32)
    p = PROTOCOL
    calib = load_windows(tokenizer, p["calib_text"], "calibration", p["calib_windows"], p["calib_seqlen"], seed=p["seed"])
    row: dict = {"variant": variant, "ratio": ratio}
    if variant != "dense":
        record = WORK / f"soco-record-{variant}-{ratio:.2f}.json" if variant.startswith("soco") else None
        recipe = lowrank.Recipe(scalings=["whitening"], allocator=allocator_for(variant, ratio, record), ratio=ratio,
                                seed=p["seed"], name=variant)
        grad = load_windows(tokenizer, p["calib_text"], "calibration", p["grad_windows"], p["grad_seqlen"], seed=p["seed"])
        t0 = time.perf_counter()
        with austen512.RSSPeak() as rss:
            report = lowrank.compress(model, recipe, calib, batch_size=8, progress=False, gradient_data=grad)
        row.update(compress_seconds=time.perf_counter() - t0, ratio_achieved=report.ratio_achieved,
                   target_params=report.target_params_after, dense_matrices=report.dense_matrices,
                   timings=report.timings, notes=report.notes, rss_start_mb=rss.start / 2**20,
                   rss_peak_mb=rss.peak / 2**20, record=str(record) if record else None)
    for text in p["eval_texts"]:
        windows = load_windows(tokenizer, text, "evaluation", p["eval_windows"], p["eval_seqlen"])
        row[f"ppl:{text.split(':')[-1]}"] = perplexity(model, windows, batch_size=4, progress=False).perplexity
    return row


def load_rows() -> dict[str, dict]:
    return json.loads(ROWS.read_text()) if ROWS.exists() else {}


def key(variant: str, ratio: float) -> str:
    return f"{variant}@{ratio:.2f}"


def table(rows: dict[str, dict], info: dict) -> str:
    """The markdown results: the comparison, then the ablations."""
    p = PROTOCOL
    dense = rows.get(key("dense", 0.0), {})
    lines = ["# SoCo on AUSTEN-512, CPU reduced setting", "",
             f"Machine: {info['cpu']} ({info['cores']} cores, shared: the run went beside other jobs), no GPU; "
             f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}.",
             f"Protocol: SmolLM2-135M float32; whitening statistics and SoCo training on {p['calib_windows']} x "
             f"{p['calib_seqlen']} tokens of emma (seed 3); zero-sum gradients {p['grad_windows']} x {p['grad_seqlen']} "
             f"of emma (seed 3); perplexity on the first {p['eval_windows']} windows of {p['eval_seqlen']} of "
             f"prideprejudice (P&P) and persuasion (Pers., never calibrated on). SoCo steps per stage "
             f"{SOCO_CPU['steps']}, {SOCO_CPU['batch_windows']} windows per step.",
             f"Dense: P&P {dense.get('ppl:prideprejudice', float('nan')):.2f}, Pers. {dense.get('ppl:persuasion', float('nan')):.2f}.",
             "", "`achieved`: fraction of the targeted parameters removed. Time: compression wall seconds "
             "(model load and evaluation excluded). RSS: peak resident memory sampled during compression "
             "(MiB; the process holds the model, about 540 MiB, before it starts).", "",
             "| variant | ratio | achieved | P&P ppl | Pers. ppl | dense kept | compress s | RSS peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    zs = {r["ratio"]: r for r in rows.values() if r["variant"] == "zero-sum"}

    def versus(r: dict, text: str) -> str:
        base = zs.get(r["ratio"])
        if r["variant"] == "zero-sum" or base is None:
            return ""
        return f" ({100 * (r[text] / base[text] - 1):+.0f}%)"

    for k in sorted(rows, key=lambda k: (rows[k]["ratio"], VARIANTS.index(rows[k]["variant"])
                                          if rows[k]["variant"] in VARIANTS else -1)):
        r = rows[k]
        if r["variant"] == "dense":
            continue
        lines.append(f"| {r['variant']} | {r['ratio']:.1f} | {r['ratio_achieved']:.4f} | {r['ppl:prideprejudice']:.2f}"
                     f"{versus(r, 'ppl:prideprejudice')} | {r['ppl:persuasion']:.2f}{versus(r, 'ppl:persuasion')} | "
                     f"{r['dense_matrices']} | {r['compress_seconds']:.0f} | {r['rss_peak_mb']:.0f} |")
    lines += ["", "Percentages: change against zero-sum at the same ratio. Variants other than zero-sum and soco "
              "are the ablations (module docstring of bench/soco.py); a missing row did not fit the time. "
              "docs/soco.md reads these numbers; the stage notes of each SoCo run follow.", ""]
    for r in rows.values():
        for note in r.get("notes", []):
            if note.startswith("soco") and r["variant"] == "soco":
                lines.append(f"- {r['ratio']:.1f}: {note}")
    return "\n".join(lines) + "\n"


def plot_importance(record: Path, out: Path) -> None:
    """Learned importance (stage-2 logits) and the final mask against singular-value order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(record.read_text())["matrices"]
    wanted = (".layers.2.self_attn.q_proj", ".layers.14.self_attn.v_proj", ".layers.14.mlp.up_proj",
              ".layers.28.mlp.down_proj")
    names = [n for n in data if n.endswith(wanted)] or list(data)[:4]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        m = data[name]
        order = range(len(m["importance"]))
        kept = m["mask"]
        ax.scatter(order, m["importance"], s=3, c=["tab:blue" if k else "tab:red" for k in kept])
        ax.set_ylabel("learned logit")
        ax2 = ax.twinx()
        ax2.plot(order, m["sigma"], color="gray", lw=0.8)
        ax2.set_yscale("log")
        ax2.set_ylabel("sigma (whitened)")
        status = "dense" if m["dense"] else f"rank {sum(kept)}"
        ax.set_title(f"{name}: {status}, kept (blue) / pruned (red) by singular-value index", fontsize=8)
    axes[-1, 0].set_xlabel("component index (descending singular value)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--name", default="soco-cpu")
    ap.add_argument("--plot-ratio", type=float, default=0.4)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "RATIO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], float(args.one[1]))), flush=True)
        return
    WORK.mkdir(exist_ok=True)
    rows = load_rows()
    jobs = [("dense", 0.0)] + [(v, r) for v in args.variants for r in args.ratios]
    for variant, ratio in [] if args.report_only else jobs:
        if key(variant, ratio) in load_rows():
            continue
        proc = subprocess.run([sys.executable, __file__, "--one", variant, str(ratio)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{variant} @ {ratio}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        rows = {**load_rows(), key(variant, ratio): json.loads(line[0][7:])}   # other runners may have added rows
        ROWS.write_text(json.dumps(rows, indent=1))
        r = rows[key(variant, ratio)]
        print(f"{variant:>12} @ {ratio:.2f}: P&P {r['ppl:prideprejudice']:.2f}  Pers. {r['ppl:persuasion']:.2f}  "
              f"{r.get('compress_seconds', 0):.0f}s", flush=True)
    rows = load_rows()
    out = HERE / "results"
    info = austen512.machine()
    (out / f"{args.name}.json").write_text(json.dumps({"protocol": PROTOCOL, "soco_cpu": SOCO_CPU, "machine": info,
                                                      "rows": rows}, indent=1))
    (out / f"{args.name}.md").write_text(table(rows, info))
    record = WORK / f"soco-record-soco-{args.plot_ratio:.2f}.json"
    if not record.exists():   # the ratio asked for did not run: any SoCo record will do
        record = next(iter(sorted(WORK.glob("soco-record-soco-0.*.json"))), record)   # soco's own, not an ablation's
    if record.exists():
        plot_importance(record, out / f"{args.name}-importance.png")


if __name__ == "__main__":
    main()
