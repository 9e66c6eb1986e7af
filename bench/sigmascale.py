"""SigmaScale on AUSTEN-512: the learned scalings, their compositions, their speed, and the paper's
effective-rank claim. Everything, in this order (on one H100 about 9 minutes for the recipes, as
measured in results/sigmascale-h100.md, and 1-2 for the speed part: split it in two calls under a
10-minute limit; the tables are rewritten after every configuration, so an interrupted run keeps
what it finished):

    HF_HUB_OFFLINE=1 python bench/sigmascale.py

Parts (``--only recipes correlation`` / ``--only speed`` split it in two):

- recipes: sigmascale (uniform ranks), sigmascale initialised from ASVD, whitening + sigmascale,
  whitening + sigmascale with the block-output objective, at the ratios, through AUSTEN-512's own
  machinery (``austen512.run_one``: windows, compression, perplexity, timings, memory), in this
  process on a fresh copy of a model loaded once (``--subprocess``: a process per configuration, as
  bench/austen512.py does); the recipe YAML files are written to bench/work/. The
  identity/asvd/whitening baselines are read from results/ (any AUSTEN-512 JSON with those rows for
  this protocol) or run when missing. -> results/sigmascale.{md,json,png}
- correlation: per matrix of the sigmascale runs, the reduction of the effective-rank entropy
  against the reduction of the layer loss (Pearson and Spearman). -> results/sigmascale-correlation.{png,json}
- speed: on real SmolLM2 matrices with their real calibration inputs (the protocol's 128 x 512
  AUSTEN windows), time per matrix and final layer loss of the published computation (loss over
  the activations, gradients through torch.linalg.svd, AdamW lr 5e-3 for 1000 steps) against this
  implementation (Gram-form loss, gap-only truncation backward): the same AdamW schedule (same
  loss, per-step speed), AdamW 200 steps at lr 2e-2 (about the same final loss in far fewer steps),
  and the recipes' L-BFGS setting. -> results/sigmascale-speed.{md,json}

The layer-loss recipes learn with 12 L-BFGS iterations (``--steps``; ``--layer-optimizer adamw
--steps 60 --lr 3e-2`` for the published optimizer on a short schedule, about 3x the GPU time), the
block objective with 12 L-BFGS iterations on one batch of 8 calibration windows (``--block-steps``,
``--block-windows``), not the published 1000 AdamW steps at 5e-3, to fit the time budget; the
speed table shows what the shorter schedules cost in layer loss.

Small CPU smoke run: ``--device cpu --calib-windows 8 --eval-windows 4 --ratios 0.4 --steps 3
--block-steps 2 --targets 're:layers\\.3\\.' --speed-steps 20 --speed-short 5 --name sigmascale-cpu-smoke``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import austen512  # noqa: E402  (the AUSTEN-512 machinery: protocol, windows, run_one, machine)

RESULTS = HERE / "results"
WORK = HERE / "work"
BASELINES = ("identity", "asvd", "whitening")


# --------------------------------------------------------------------------------------------------
# recipes


def recipe_specs(args) -> dict[str, dict]:
    """name -> recipe dict (a lowrank recipe file)."""
    layer = ({"optimizer": "lbfgs", "steps": args.steps} if args.layer_optimizer == "lbfgs"
             else {"steps": args.steps, "lr": args.lr})  # AdamW: batched, the published optimizer
    block = {"optimizer": "lbfgs", "steps": args.block_steps, "objective": "block",
             "block_windows": args.block_windows}
    specs = {
        "sigmascale": [{"sigmascale": layer}],
        "sigmascale-asvd-init": [{"sigmascale": {**layer, "init": "asvd"}}],
        # in whitened coordinates the layer loss is the plain Frobenius error, for which the
        # identity is optimal (Eckart-Young): start there; the run confirms nothing is left to learn
        "whitening+sigmascale": ["whitening", {"sigmascale": {**layer, "init_std": 0.0, "steps": min(args.steps, 5)}}],
        "whitening+sigmascale-block": ["whitening", {"sigmascale": block}],
    }
    return {name: {"lowrank_recipe": 1, "name": name, "scalings": sc, "allocator": "uniform",
                   "targets": args.targets, "seed": austen512.PROTOCOL["seed"]} for name, sc in specs.items()}


def write_recipes(args) -> dict[str, Path]:
    import yaml

    folder = WORK / "sigmascale-recipes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in recipe_specs(args).items():
        if args.recipes and name not in args.recipes:
            continue
        if spec["targets"] is None:
            spec = {k: v for k, v in spec.items() if k != "targets"}
        else:
            spec["targets"] = [spec["targets"]]
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        paths[name] = path
    return paths


# --------------------------------------------------------------------------------------------------
# one configuration (subprocess): austen512.run_one with the compression report kept


def run_one(args, recipe: str, ratio: float) -> dict:
    import lowrank

    captured = {}
    original = lowrank.compress

    def compress(*a, **kw):
        report = original(*a, **kw)
        captured["report"] = report
        return report

    lowrank.compress = compress  # run_one calls lowrank.compress; keep its report for the diagnostics
    try:
        row = austen512.run_one(args.model, None if recipe == "dense" else recipe, ratio, args.device, protocol(args))
    finally:
        lowrank.compress = original
    row["recipe"] = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else row["recipe"]
    report = captured.get("report")
    if report is not None:
        mats = []
        for m in report.matrices:
            d = {k.split(".", 1)[1]: v for k, v in m.diagnostics.items() if k.startswith("sigmascale.")}
            mats.append({"name": m.name, "shape": list(m.shape), "rank": m.rank,
                         "activation_error": m.activation_error, **d})
        row["matrices"] = mats
        learned = [m for m in mats if "loss_start" in m]
        if learned:
            row["learning_seconds"] = sum(m.get("seconds", 0.0) for m in learned)
            row["matrices_improved"] = sum(m["loss_learned"] < m["loss_start"] for m in learned)
            row["matrices_learned"] = len(learned)
            red = sorted(1 - m["loss_learned"] / m["loss_start"] for m in learned if m["loss_start"] > 0)
            row["median_loss_reduction"] = red[len(red) // 2] if red else 0.0
    return row


def protocol(args) -> dict:
    p = {**austen512.PROTOCOL, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows}
    if args.model.startswith("gemma"):
        p["bos"] = True
    return p


def spawn(args, recipe: str, ratio: float) -> dict | None:
    """One configuration in a fresh subprocess (AUSTEN-512's isolation: its own peak memory)."""
    cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device,
           "--calib-windows", str(args.calib_windows), "--eval-windows", str(args.eval_windows),
           "--one", recipe, str(ratio)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(f"{recipe} @ {ratio}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[0][7:])


_LOADED: dict = {}


def in_process(args, recipe: str, ratio: float) -> dict | None:
    """One configuration in this process: austen512.run_one on a fresh copy of a model loaded once
    (loading SmolLM2 from its GGUF costs ~10 s per subprocess on the H100 host, more than most
    learned runs). Peak GPU memory is reset per configuration; peak RSS is the process's."""
    import copy

    import torch

    import lowrank.data.bundled as models

    if "real" not in _LOADED:
        _LOADED["real"] = models.load_model

        def load_model(name, dtype=None, **kw):
            key = (name, dtype)
            if key not in _LOADED:
                _LOADED[key] = _LOADED["real"](name, dtype=dtype, **kw)
            model, tok = _LOADED[key]
            return copy.deepcopy(model), tok

        models.load_model = load_model
        _warm_up(args)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row = run_one(args, recipe, ratio)
    except Exception as err:  # noqa: BLE001  (report and go on with the next configuration)
        print(f"{recipe} @ {ratio}: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    row["process"] = "shared"
    return row


def _warm_up(args) -> None:
    """Pay CUDA/cuSOLVER initialisation before the first timed configuration."""
    import torch

    from lowrank import resolve_device

    dev, _ = resolve_device(args.device)
    a = torch.randn(64, 48, device=dev, dtype=torch.float64)
    for dt in (torch.float32, torch.float64):
        b = a.to(dt)
        torch.linalg.svd(b, full_matrices=False)
        torch.linalg.eigh(b.T @ b)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_config(args, recipe: str, ratio: float) -> dict | None:
    return spawn(args, recipe, ratio) if args.subprocess else in_process(args, recipe, ratio)


def find_baselines(args) -> list[dict]:
    """Rows of identity/asvd/whitening (and dense) from any AUSTEN-512 result of this protocol."""
    want = protocol(args)
    rows: dict[tuple[str, float], dict] = {}
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        p = data.get("protocol", {}) if isinstance(data, dict) else {}
        if not isinstance(data, dict) or any(p.get(k) != want[k] for k in ("calib_text", "calib_windows", "seqlen",
                                                                              "seed", "eval_text", "eval_windows")):
            continue
        for r in data.get("rows", []):
            if r.get("model") == args.model and r.get("recipe") in (*BASELINES, "dense"):
                r = {**r, "source": path.name}
                rows.setdefault((r["recipe"], round(r["ratio"], 4)), r)
    return list(rows.values())


# --------------------------------------------------------------------------------------------------
# the speed comparison


def speed(args) -> dict:
    import torch

    from lowrank import LayerStats, resolve_device, uniform_rank, weight_of
    from lowrank.data import load_model
    from lowrank_builtin.sigmascale import SigmaScale

    dev, _ = resolve_device(args.device)
    model, tok = load_model(args.model, dtype=torch.float32)
    model.to(dev).eval()
    calib, _ = austen512.windows(args.model, tok, protocol(args))
    names = args.speed_matrices
    inputs: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, a, out, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    with torch.no_grad():
        for batch in calib.split(8):
            model(input_ids=batch.to(dev), use_cache=False)
    for h in hooks:
        h.remove()
    steps = args.speed_steps
    modes = {
        f"published: activations, torch.linalg.svd autograd, AdamW {steps} x lr 5e-3":
            dict(loss="activations", truncation="autograd", batched=False, steps=steps, lr=5e-3),
        f"gram + gap backward, AdamW {steps} x lr 5e-3 (same schedule)":
            dict(steps=steps, lr=5e-3),
        f"gram + gap backward, AdamW {args.speed_short} x lr 2e-2":
            dict(steps=args.speed_short, lr=2e-2),
        **({f"gram + gap backward, L-BFGS {args.steps} iterations (the bench recipes)":
            dict(optimizer="lbfgs", steps=args.steps)} if args.layer_optimizer == "lbfgs" else
           {f"gram + gap backward, AdamW {args.steps} x lr {args.lr:g} (the bench recipes)":
            dict(steps=args.steps, lr=args.lr)}),
    }
    rows = []
    for name in names:
        x = torch.cat(inputs[name])
        w = weight_of(model.get_submodule(name)).detach().to(dev, torch.float64)
        xd = x.double()
        stats = LayerStats(xd.T @ xd, x.shape[0], None, inputs=x)
        del xd
        rank = uniform_rank(tuple(w.shape), args.speed_ratio)
        for label, cfg in modes.items():
            scaling = SigmaScale(**cfg)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            t = scaling.fit(w, stats, rank=rank)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
            d = t.diagnostics
            rows.append({"matrix": name, "shape": list(w.shape), "rank": rank, "tokens": int(x.shape[0]),
                         "mode": label, "seconds": seconds, "evaluations": d["steps"],
                         "loss_start": d["loss_start"], "loss_learned": d["loss_learned"]})
            print(f"speed {name} {label}: {seconds:.2f}s, loss {d['loss_start']:.4g} -> {d['loss_learned']:.4g}", flush=True)
    ref = list(modes)[0]
    for r in rows:
        base = next(b for b in rows if b["matrix"] == r["matrix"] and b["mode"] == ref)
        r["speedup"] = base["seconds"] / r["seconds"] if r["seconds"] > 0 else math.inf
        r["loss_vs_published"] = r["loss_learned"] / base["loss_learned"] if base["loss_learned"] > 0 else 1.0
    info = austen512.machine()
    out = {"machine": info, "protocol": protocol(args), "ratio": args.speed_ratio, "steps": steps, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}-speed.json").write_text(json.dumps(out, indent=2))
    lines = [f"# SigmaScale speed: {args.model}", "",
             f"Machine: {info.get('gpu', 'no GPU')}; {info['cpu']} ({info['cores']} cores); torch {info['torch']}.",
             f"Real matrices and their calibration inputs ({protocol(args)['calib_windows']} x {protocol(args)['seqlen']} "
             f"tokens of {protocol(args)['calib_text']}); rank for ratio {args.speed_ratio} (uniform). Time = the "
             "whole fit of one matrix (learning + float64 final check); loss = ||(W - W')X||^2 / (T m n) in float64, "
             "the same definition for every mode. The published computation runs unbatched; the pipeline also "
             "batches same-shaped matrices (not used here).", "",
             "| matrix | shape | rank | mode | evaluations | seconds | speedup | loss start | loss learned | loss / published |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | {r['mode']} | {r['evaluations']:.0f} | "
                     f"{r['seconds']:.2f} | {r['speedup']:.1f}x | {r['loss_start']:.4g} | {r['loss_learned']:.4g} | "
                     f"{r['loss_vs_published']:.4f} |")
    (RESULTS / f"{args.name}-speed.md").write_text("\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# the tables, the plot and the correlation


def write_tables(args, rows: list[dict], baselines: list[dict]) -> None:
    info = austen512.machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"protocol": protocol(args), "machine": info, "recipes": recipe_specs(args), "rows": rows,
         "baselines": baselines}, indent=2))
    everything = sorted(baselines + rows, key=lambda r: (r["recipe"] != "dense", r["ratio"], r["recipe"]))
    lines = [f"# AUSTEN-512: SigmaScale ({args.model})", "",
             f"Machine: {info.get('gpu', 'no GPU')}; {info['cpu']} ({info['cores']} cores, {info['memory_gb']} GB); "
             f"torch {info['torch']}.",
             f"Protocol: calibration {protocol(args)['calib_windows']}x{protocol(args)['seqlen']} from "
             f"{protocol(args)['calib_text']}; evaluation first {protocol(args)['eval_windows']} windows of "
             f"{protocol(args)['seqlen']} from {protocol(args)['eval_text']}. Compress s = lowrank.compress wall "
             "time (load and evaluation excluded); learn s = time inside SigmaScale; peak GPU = "
             "torch.cuda.max_memory_allocated during compression (reset per configuration); peak RSS = the "
             "highest resident memory sampled during compression when recorded, else the process's; "
             "configurations run in one process on fresh copies of the model unless --subprocess; improved = matrices whose learned loss is below "
             "the identity start (the layer loss; the block loss for the block objective). Baseline rows come "
             "from the file named in 'source'.", "",
             "| recipe | ratio | achieved | perplexity | compress s | learn s | peak GPU MB | peak RSS MB | improved | median loss reduction | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in everything:
        t = r.get("timings", {})
        gpu = r.get("compress_gpu_peak_mb", r.get("peak_gpu_mb"))
        rss = r.get("compress_rss_peak_mb", r.get("peak_rss_mb", 0.0))
        improved = f"{r['matrices_improved']}/{r['matrices_learned']}" if "matrices_learned" in r else ""
        red = f"{r['median_loss_reduction']:.3f}" if "median_loss_reduction" in r else ""
        lines.append(f"| {r['recipe']} | {r['ratio']:.2f} | {r.get('ratio_achieved', 0):.4f} | {r['perplexity']:.3f} | "
                     f"{t.get('total', 0):.1f} | {r.get('learning_seconds', 0):.1f} | "
                     f"{'' if gpu is None else f'{gpu:.0f}'} | {rss:.0f} | {improved} | {red} | "
                     f"{r.get('source', 'this run')} |")
    lines += ["", "## Checks", ""] + [f"- {c}" for c in checks(rows, baselines)]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    austen512.plot(everything, RESULTS / f"{args.name}.png", f"SigmaScale ({args.model})")


def checks(rows: list[dict], baselines: list[dict]) -> list[str]:
    def ppl(recipe: str, ratio: float) -> float | None:
        for r in rows + baselines:
            if r["recipe"] == recipe and abs(r["ratio"] - ratio) < 1e-9:
                return r["perplexity"]
        return None

    out = []
    ratios = sorted({r["ratio"] for r in rows})
    for ratio in ratios:
        s, a, i, w = (ppl(x, ratio) for x in ("sigmascale", "asvd", "identity", "whitening"))
        if s is not None and a is not None and i is not None:
            out.append(f"ratio {ratio:.2f}: sigmascale {s:.3f} vs asvd {a:.3f}, identity {i:.3f}: "
                       f"{'PASS' if s < a and s < i else 'FAIL'}")
        ours = {r["recipe"]: r["perplexity"] for r in rows if abs(r["ratio"] - ratio) < 1e-9}
        if ours and w is not None:
            best = min(ours, key=ours.get)
            out.append(f"ratio {ratio:.2f}: best composition {best} {ours[best]:.3f} vs whitening {w:.3f}: "
                       f"{'PASS' if ours[best] < w else 'FAIL'}")
        for r in rows:
            if r["recipe"] == "sigmascale" and abs(r["ratio"] - ratio) < 1e-9 and "matrices_learned" in r:
                out.append(f"ratio {ratio:.2f}: sigmascale layer loss below its start for "
                           f"{r['matrices_improved']}/{r['matrices_learned']} matrices: "
                           f"{'PASS' if r['matrices_improved'] == r['matrices_learned'] else 'FAIL'}")
    return out


def correlation(args, rows: list[dict]) -> dict | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    src = [r for r in rows if r["recipe"] == "sigmascale" and r.get("matrices")]
    if not src:
        return None
    out = {"runs": []}
    fig, axes = plt.subplots(1, len(src), figsize=(max(7.0, 5.0 * len(src)), 4.5), squeeze=False)
    for ax, r in zip(axes[0], src):
        pts = [m for m in r["matrices"] if "loss_start" in m and m["loss_start"] > 0]
        d_entropy = [m["effective_rank_before"] - m["effective_rank_after"] for m in pts]
        d_loss = [m["loss_start"] - m["loss_learned"] for m in pts]
        d_loss_rel = [1 - m["loss_learned"] / m["loss_start"] for m in pts]
        d_entropy_rel = [1 - m["effective_rank_after"] / m["effective_rank_before"] for m in pts]
        res = {"ratio": r["ratio"], "matrices": len(pts)}
        for label, xs, ys in (("absolute", d_entropy, d_loss), ("relative", d_entropy_rel, d_loss_rel)):
            if len(pts) >= 3:
                pr, pp = sps.pearsonr(xs, ys)
                sr, sp = sps.spearmanr(xs, ys)
                res[label] = {"pearson": float(pr), "pearson_p": float(pp), "spearman": float(sr), "spearman_p": float(sp)}
        kinds = sorted({m["name"].rsplit(".", 1)[-1] for m in pts})
        for k in kinds:
            sel = [i for i, m in enumerate(pts) if m["name"].endswith(k)]
            ax.scatter([d_entropy_rel[i] for i in sel], [d_loss_rel[i] for i in sel], s=12, label=k)
        rel = res.get("relative", {})
        ax.set_title(f"ratio {r['ratio']:.2f}: Pearson {rel.get('pearson', float('nan')):.2f}, "
                     f"Spearman {rel.get('spearman', float('nan')):.2f}", fontsize=9)
        ax.set_xlabel("effective-rank (entropy) reduction, relative")
        ax.set_ylabel("layer loss reduction, relative")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out["runs"].append(res)
    fig.suptitle(f"SigmaScale on {args.model}: entropy reduction vs loss reduction per matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}-correlation.png", dpi=120)
    plt.close(fig)
    (RESULTS / f"{args.name}-correlation.json").write_text(json.dumps(out, indent=2))
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--recipes", nargs="+", default=None, help="subset of the recipes (default: all four)")
    p.add_argument("--only", nargs="+", choices=["speed", "recipes", "correlation"], default=None)
    p.add_argument("--name", default="sigmascale", help="results file stem")
    p.add_argument("--layer-optimizer", choices=["lbfgs", "adamw"], default="lbfgs",
                   help="optimizer of the layer-loss recipes")
    p.add_argument("--steps", type=int, default=12,
                   help="their L-BFGS iterations (AdamW: steps; published AdamW 1000 x lr 5e-3)")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate with --layer-optimizer adamw")
    p.add_argument("--block-steps", type=int, default=12, help="L-BFGS iterations of the block objective")
    p.add_argument("--block-windows", type=int, default=1, help="calibration batches (of 8 windows) for the block loss")
    p.add_argument("--targets", default=None, help="module pattern (e.g. 're:layers\\.3\\.'), for smoke runs")
    p.add_argument("--calib-windows", type=int, default=austen512.PROTOCOL["calib_windows"])
    p.add_argument("--eval-windows", type=int, default=austen512.PROTOCOL["eval_windows"])
    p.add_argument("--speed-steps", type=int, default=1000, help="AdamW steps in the speed comparison (published 1000)")
    p.add_argument("--speed-ratio", type=float, default=0.4)
    p.add_argument("--speed-short", type=int, default=200, help="AdamW steps at lr 2e-2 in the speed comparison")
    p.add_argument("--speed-matrices", nargs="+", default=["model.layers.3.self_attn.k_proj",
                                                            "model.layers.3.self_attn.o_proj"])
    p.add_argument("--no-baselines", action="store_true", help="do not run missing baselines")
    p.add_argument("--subprocess", action="store_true",
                   help="one subprocess per configuration (AUSTEN-512's isolation; +~15 s each for import and load)")
    p.add_argument("--one", nargs=2, metavar=("RECIPE", "RATIO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        row = run_one(args, args.one[0], float(args.one[1]))
        print("RESULT " + json.dumps(row), flush=True)
        return
    parts = set(args.only or ["speed", "recipes", "correlation"])
    started = time.perf_counter()
    rows: list[dict] = []
    if "recipes" in parts:
        baselines = find_baselines(args)
        have = {(r["recipe"], round(r["ratio"], 4)) for r in baselines}
        missing = [(b, x) for b in BASELINES for x in args.ratios if (b, round(x, 4)) not in have]
        if ("dense", 0.0) not in have:
            missing.insert(0, ("dense", 0.0))
        if args.targets is not None:
            missing = []  # a smoke run on a few targets: the full-model baselines do not compare
        if missing and not args.no_baselines:
            for spec, ratio in missing:
                row = run_config(args, spec, ratio)
                if row is not None:
                    baselines.append(row)
        paths = write_recipes(args)
        jobs = [(name, path, ratio) for ratio in args.ratios for name, path in paths.items()]
        for done, (name, path, ratio) in enumerate(jobs, 1):
            row = run_config(args, str(path), ratio)
            if row is None:
                continue
            rows.append(row)
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:.0f}s] {name:>28} @ {ratio:.2f}: ppl {row['perplexity']:.3f}  "
                  f"compress {row.get('timings', {}).get('total', 0):.1f}s  learn {row.get('learning_seconds', 0):.1f}s  "
                  f"improved {row.get('matrices_improved', '-')}/{row.get('matrices_learned', '-')}  "
                  f"(recipes ETA {elapsed / done * (len(jobs) - done):.0f}s)", flush=True)
            write_tables(args, rows, baselines)
        for line in checks(rows, baselines):
            print(line)
    elif "correlation" in parts:
        path = RESULTS / f"{args.name}.json"
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
    if "correlation" in parts:
        res = correlation(args, rows)
        if res:
            for r in res["runs"]:
                print(f"correlation @ {r['ratio']:.2f}: " + ", ".join(
                    f"{k} pearson {v['pearson']:.3f} spearman {v['spearman']:.3f}" for k, v in r.items() if isinstance(v, dict)))
    if "speed" in parts:  # last: the published computation's 1000 steps are the slowest part
        speed(args)
        print(f"[{time.perf_counter() - started:.0f}s] speed done", flush=True)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
