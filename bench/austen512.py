"""AUSTEN-512: the benchmark protocol of this project (see README.md beside this file).

    python bench/austen512.py --recipes identity asvd whitening --ratios 0.2 0.4 0.6 --name analytic

Model SmolLM2-135M-Instruct in float32 (Gemma 3 270M with --model gemma3-270m, with BOS).
Calibration: 128 windows of 512 tokens drawn with seed 3 from `emma` (tokenized once).
Evaluation: `prideprejudice`, non-overlapping 512-token windows from token 0, the first 64.
Gradients (strategies that score from the calibration loss, e.g. zero-sum): the first calibration
window (512 tokens), as the official ZS-SVD code takes it, passed as `gradient_data`
(`--grad-offsets 0 1 2` repeats each run with calibration windows 0, 1 and 2: one gradient window
is a lottery, so stochastic results are reported over several); scalings that collect gradient
statistics (fwsvd) use the calibration windows instead. `--grad-seqlen 2048` draws a separate
window of that length from `emma` instead (the setting of earlier results files).
Each (recipe, ratio) runs in a fresh subprocess, so its peak resident memory is its own.

A recipe is `SCALING[+SCALING...][/ALLOCATOR]` (e.g. `whitening`, `asvd+whitening/energy`), a
preset (`preset:zs-svd`) or the path of a recipe YAML file (the ratio is overridden by --ratios).
`--extra-eval austen:persuasion` also evaluates each compressed model on another text (same window
rule), without compressing again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
PROTOCOL = {"calib_text": "austen:emma", "calib_windows": 128, "seqlen": 512, "seed": 3,
            "eval_text": "austen:prideprejudice", "eval_windows": 64,
            "grad_windows": 1, "grad_seqlen": 512, "grad_offset": 0}


class RSSPeak:
    """Highest resident memory of this process while the block runs, sampled every few ms
    (ru_maxrss is a whole-process high-water mark: model loading would hide what compression adds)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = None

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "RSSPeak":
        import threading

        self.start = self.peak = self.current()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.current())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_recipe(spec: str, ratio: float, device: str):
    import dataclasses

    import lowrank

    if spec.endswith((".yaml", ".yml")):
        return dataclasses.replace(lowrank.Recipe.load(spec), ratio=ratio, device=device)
    if spec.startswith("preset:"):
        return lowrank.Recipe.preset(spec.split(":", 1)[1], ratio=ratio, device=device)
    scal, _, alloc = spec.partition("/")
    return lowrank.Recipe(scalings=scal.split("+"), allocator=alloc or "uniform", ratio=ratio,
                          device=device, seed=PROTOCOL["seed"], name=spec)


def windows(model_name: str, tokenizer, protocol: dict):
    """Token windows of the protocol, cached under bench/work/ (tokenizing a novel takes seconds)."""
    import torch

    from lowrank.data import load_windows

    WORK.mkdir(exist_ok=True)
    calib_seqlen = protocol.get("calib_seqlen", protocol["seqlen"])
    # v2: every start drawn in one randint call (the protocol's windows; earlier files drew one at a time)
    key = (f"{model_name}-{protocol['calib_windows']}-{protocol['eval_windows']}-{protocol['seqlen']}"
           f"-{protocol['eval_text'].split(':')[-1]}-v2.pt")
    if calib_seqlen != protocol["seqlen"]:
        key = key.replace(".pt", f"-c{calib_seqlen}.pt")
    path = WORK / key
    if path.exists():
        return torch.load(path)
    calib = load_windows(tokenizer, protocol["calib_text"], "calibration", protocol["calib_windows"],
                         calib_seqlen, seed=protocol["seed"])
    evaluation = load_windows(tokenizer, protocol["eval_text"], "evaluation", protocol["eval_windows"], protocol["seqlen"])
    torch.save((calib, evaluation), path)
    return calib, evaluation


def gradient_windows(model_name: str, tokenizer, protocol: dict, calib):
    """The gradient windows: calibration windows ``grad_offset`` onwards when they have the
    calibration's length (ZS-SVD's official code), else a separate draw from the calibration text."""
    import torch

    from lowrank.data import load_windows

    n, length = protocol.get("grad_windows", 0), protocol.get("grad_seqlen", 0)
    if not n or not length:
        return None
    if length == calib.shape[1]:
        offset = protocol.get("grad_offset", 0)
        return calib[offset:offset + n]
    WORK.mkdir(exist_ok=True)
    path = WORK / f"{model_name}-grad-{n}x{length}-s{protocol['seed']}.pt"
    if path.exists():
        return torch.load(path)
    grad = load_windows(tokenizer, protocol["calib_text"], "calibration", n, length, seed=protocol["seed"])
    torch.save(grad, path)
    return grad


def run_one(model_name: str, spec: str | None, ratio: float | None, device: str, protocol: dict) -> dict:
    """One configuration in this process: load, compress, evaluate."""
    import torch

    import lowrank
    from lowrank import resolve_device
    from lowrank.data import load_model, perplexity

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    calib, evaluation = windows(model_name, tokenizer, protocol)
    dev, _ = resolve_device(device)
    row: dict = {"model": model_name, "recipe": spec or "dense", "ratio": ratio or 0.0, "load_seconds": load_s,
                 "grad_offset": protocol.get("grad_offset", 0), "eval_text": protocol["eval_text"]}
    if spec is not None:
        recipe = make_recipe(spec, ratio, device)
        if dev.type == "cuda":
            model.to(dev)
        # gradient statistics of a scaling (fwsvd) come from the calibration windows
        grad_stats = any(s.requires & {"grad_row_sq", "grad_col_sq"} for s in recipe.scalings)
        grad = None if grad_stats else gradient_windows(model_name, tokenizer, protocol, calib)
        with RSSPeak() as rss:
            report = lowrank.compress(model, recipe, calib, batch_size=8, progress=False, gradient_data=grad)
        row.update(ratio_achieved=report.ratio_achieved, target_params=report.target_params_after,
                   target_params_before=report.target_params_before, dense_matrices=report.dense_matrices,
                   timings=report.timings, notes=report.notes,
                   mean_activation_error=sum(m.activation_error for m in report.matrices) / len(report.matrices),
                   compress_rss_start_mb=rss.start / 2**20, compress_rss_peak_mb=rss.peak / 2**20,
                   ranks=[[m.name, m.block, m.rank, list(m.shape)] for m in report.matrices])
        if dev.type == "cuda":
            row["compress_gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    model.to(dev)
    result = perplexity(model, evaluation, batch_size=8, device=dev, progress=False)
    row.update(perplexity=result.perplexity, finite=result.finite, eval_tokens=result.tokens,
               model_params=lowrank.count_parameters(model), eval_seconds=result.seconds,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for text in protocol.get("extra_eval", []):
        other = _eval_windows(model_name, tokenizer, text, protocol)
        row.setdefault("extra_perplexity", {})[text] = perplexity(
            model, other, batch_size=8, device=dev, progress=False).perplexity
    if dev.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def _eval_windows(model_name: str, tokenizer, text: str, protocol: dict):
    """The evaluation windows of another text (the protocol's rule), cached under bench/work/."""
    import torch

    from lowrank.data import load_windows

    path = WORK / f"{model_name}-eval-{text.split(':')[-1]}-{protocol['eval_windows']}-{protocol['seqlen']}.pt"
    if path.exists():
        return torch.load(path)
    windows = load_windows(tokenizer, text, "evaluation", protocol["eval_windows"], protocol["seqlen"])
    torch.save(windows, path)
    return windows


def floor_seconds(t: dict) -> float:
    """The pipeline's floor: one forward pass of the calibration set plus the factorizations."""
    return t.get("forward", 0.0) + t.get("factorization", 0.0)


def write_results(rows: list[dict], name: str, info: dict, protocol: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"protocol": protocol, "machine": info, "rows": rows}, indent=2))
    lines = [f"# AUSTEN-512: {name}", "",
             f"Machine: {info.get('gpu', 'no GPU')}; {info['cpu']} ({info['cores']} cores, {info['memory_gb']} GB); "
             f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}.",
             f"Protocol: calibration {protocol['calib_windows']}x{protocol['seqlen']} from {protocol['calib_text']} "
             f"(seed {protocol['seed']}); evaluation first {protocol['eval_windows']} windows of {protocol['seqlen']} "
             f"from {protocol['eval_text']}.",
             "Times in seconds, model load and evaluation excluded. floor = one forward pass of the calibration "
             "set through the uncompressed blocks + the factorizations; next-input = the extra pass through each "
             "compressed block that sequential inputs need. Peak RSS covers the whole process (load and evaluation included).", "",
             f"Other texts (same model, same window rule): {', '.join(protocol.get('extra_eval', [])) or 'none'}.", "",
             "| recipe | ratio | grad window | achieved | perplexity | other texts | target params | model params | dense kept | compress s | forward s | stats s | factor s | next-input s | total / floor | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("timings", {})
        lines.append(
            f"| {r['recipe']} | {r['ratio']:.2f} | {r.get('grad_offset', 0)} | {r.get('ratio_achieved', 0):.4f} | {r['perplexity']:.3f}"
            f"{'' if r['finite'] else ' (not finite)'} | {' / '.join(f'{v:.3f}' for v in r.get('extra_perplexity', {}).values())} | {r.get('target_params', r.get('target_params_before', 0)):,} | "
            f"{r['model_params']:,} | {r.get('dense_matrices', '')} | {t.get('total', 0):.1f} | {t.get('forward', 0):.1f} | "
            f"{t.get('statistics', 0):.1f} | {t.get('factorization', 0):.1f} | {t.get('forward_next', 0):.1f} | "
            f"{t.get('total', 0) / floor_seconds(t) if floor_seconds(t) else 0:.2f} | {r['peak_rss_mb']:.0f} |")
    lines += _spread_lines(rows)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / f"{name}.png", name)


def _groups(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["ratio"]), []).append(r)
    return groups


def _spread_lines(rows: list[dict]) -> list[str]:
    """Mean, standard deviation, min and max over the gradient windows of each (recipe, ratio) run
    more than once, for the evaluation text and every other text."""
    many = {k: v for k, v in _groups(rows).items() if len(v) > 1}
    if not many:
        return []
    lines = ["", "Over gradient windows (std: sample standard deviation):", "",
             "| recipe | ratio | windows | mean | std | min | max | other texts: mean (min-max) |",
             "|---|---|---|---|---|---|---|---|"]
    for (spec, ratio), group in many.items():
        v = [r["perplexity"] for r in group]
        mean = sum(v) / len(v)
        std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
        others = []
        for text in group[0].get("extra_perplexity", {}):
            o = [r["extra_perplexity"][text] for r in group if text in r.get("extra_perplexity", {})]
            others.append(f"{text}: {sum(o) / len(o):.3f} ({min(o):.3f}-{max(o):.3f})")
        windows = ", ".join(str(r.get("grad_offset", 0)) for r in group)
        lines.append(f"| {spec} | {ratio:.2f} | {windows} | {mean:.3f} | {std:.3f} | {min(v):.3f} | {max(v):.3f} | "
                     f"{'; '.join(others)} |")
    return lines


def plot(rows: list[dict], path: Path, title: str, ylabel: str = "perplexity (prideprejudice, 64 x 512)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [r for r in rows if r["recipe"] == "dense"]
    for spec in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "dense"):
        pts = sorted((ratio, [r["perplexity"] for r in group]) for (name, ratio), group in _groups(rows).items()
                     if name == spec)
        xs = [x for x, _ in pts]
        means = [sum(v) / len(v) for _, v in pts]
        spread = [[m - min(v) for m, (_, v) in zip(means, pts)], [max(v) - m for m, (_, v) in zip(means, pts)]]
        ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=spec)
    if dense:
        ax.axhline(dense[0]["perplexity"], color="k", ls="--", lw=1, label=f"dense {dense[0]['perplexity']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("ratio of targeted parameters removed")
    ax.set_ylabel(ylabel)
    ax.set_title(f"AUSTEN-512: {title}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(files: list[str], name: str, relabel: dict[str, str]) -> None:
    """One table from several runs of the same protocol; every row keeps the machine it ran on."""
    rows: dict[tuple, dict] = {}   # one row per (recipe, ratio, gradient window): a later file's wins
    machines, protocol = {}, None
    for f in files:
        data = json.loads(Path(f).read_text())
        keep = {k: v for k, v in data["protocol"].items() if k != "grad_offset"}
        if protocol is not None and keep != protocol:
            raise SystemExit(f"{f}: another protocol than {files[0]}")
        protocol = keep
        for r in data["rows"]:
            r = {**r, "recipe": relabel.get(r["recipe"], r["recipe"]), "machine": r.get("machine", data["machine"])}
            rows[(r["recipe"], r["ratio"], r.get("grad_offset", 0))] = r
    rows = list(rows.values())
    for r in rows:
        machines[r["machine"]["cpu"]] = r["machine"]
    rows.sort(key=lambda r: (r["recipe"] != "dense", r["recipe"], r["ratio"], r.get("grad_offset", 0)))
    info = dict(next(iter(machines.values())))
    info["cpu"] = " / ".join(machines)   # the rows ran on these (each row's JSON says which)
    write_results(rows, name, info, protocol)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["identity", "asvd", "whitening"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--name", default=None, help="results file stem (default: <model>-<recipes>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--calib-windows", type=int, default=PROTOCOL["calib_windows"], help="(protocol: 128)")
    p.add_argument("--eval-windows", type=int, default=PROTOCOL["eval_windows"], help="(protocol: 64)")
    p.add_argument("--calib-seqlen", type=int, default=PROTOCOL["seqlen"], help="(protocol: 512)")
    p.add_argument("--grad-windows", type=int, default=PROTOCOL["grad_windows"],
                   help="gradient windows (protocol: 1; 0: strategies re-cut the calibration windows)")
    p.add_argument("--grad-seqlen", type=int, default=PROTOCOL["grad_seqlen"],
                   help="(protocol: 512, i.e. calibration windows; another length draws separate windows)")
    p.add_argument("--grad-offsets", nargs="+", type=int, default=[0],
                   help="first calibration window of the gradient windows; several: one run each")
    p.add_argument("--eval-text", default=PROTOCOL["eval_text"], help="(protocol: austen:prideprejudice)")
    p.add_argument("--extra-eval", nargs="*", default=[], help="more evaluation texts, e.g. austen:persuasion")
    p.add_argument("--one", nargs=2, metavar=("RECIPE", "RATIO"), help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="run nothing: merge the rows of these results files (same protocol) into --name")
    p.add_argument("--relabel", nargs="*", default=[], metavar="OLD=NEW",
                   help="with --merge: rename recipes (the same recipe saved under another spec)")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.name, dict(pair.split("=", 1) for pair in args.relabel))
        return
    protocol = {**PROTOCOL, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
                "grad_windows": args.grad_windows, "grad_seqlen": args.grad_seqlen,
                "grad_offset": args.grad_offsets[0], "eval_text": args.eval_text, "extra_eval": args.extra_eval}
    if args.calib_seqlen != PROTOCOL["seqlen"]:
        protocol["calib_seqlen"] = args.calib_seqlen
    if args.model.startswith("gemma"):
        protocol["bos"] = True
    if args.one:
        spec, ratio = args.one
        row = run_one(args.model, None if spec == "dense" else spec, float(ratio), args.device, protocol)
        print("RESULT " + json.dumps(row), flush=True)
        return
    name = args.name or f"{args.model}-{'-'.join(r.replace('/', '_').replace('+', '_') for r in args.recipes)}"
    jobs = ([] if args.no_dense else [("dense", 0.0, 0)]) + [
        (r, x, o) for r in args.recipes for x in args.ratios for o in args.grad_offsets]
    rows = []
    for spec, ratio, offset in jobs:
        cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--calib-windows",
               str(args.calib_windows), "--eval-windows", str(args.eval_windows), "--calib-seqlen",
               str(args.calib_seqlen), "--grad-windows", str(args.grad_windows), "--grad-seqlen",
               str(args.grad_seqlen), "--grad-offsets", str(offset), "--eval-text", args.eval_text,
               "--extra-eval", *args.extra_eval, "--one", spec, str(ratio)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{spec} @ {ratio}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(line[0][7:])
        rows.append(row)
        print(f"{spec:>28} @ {ratio:.2f} (gradient window {offset}): ppl {row['perplexity']:.3f}  compress {row.get('timings', {}).get('total', 0):.1f}s  "
              f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
        write_results(rows, name, machine(), protocol)


if __name__ == "__main__":
    main()
