"""Compression speed: where the time goes, against the floor no implementation can skip.

    python bench/speed.py targets  --windows 128 --name speed-cpu          # the targets table
    python bench/speed.py windows  --sweep 16 32 64 128 --name speed-cpu   # time vs calibration size
    python bench/speed.py models   --models smollm2-135m gemma3-270m wide  --name speed-cpu
    python bench/speed.py plot     --name speed-cpu                        # redraw from the JSON

The floor is one forward pass of the calibration set through the dense blocks with the Gram
statistics accumulated, plus (sequential inputs) one more pass through each compressed block; it
is timed inside the same run (``forward + statistics + forward_next`` of the report). Each run is
its own process. ``targets`` also runs the reference factorization (``factorization: svd``, LAPACK's
float64 SVD for every matrix) and, with ``--eval-windows``, compares perplexities.

``wide`` is a synthetic Llama-architecture model (random weights, 2x SmolLM2's width, 4 blocks)
built here, to see how the factorization grows with matrix size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import austen512  # noqa: E402  (the protocol's windows and the machine description)

RESULTS = HERE / "results"
PHASES = ("capture", "forward", "statistics", "factorization", "forward_next", "planning", "gradients")


def _load(model_name: str):
    import torch

    from lowrank.data import load_model

    if model_name != "wide":
        return load_model(model_name, dtype=torch.float32)
    from transformers import LlamaConfig, LlamaForCausalLM

    base, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    config = LlamaConfig(vocab_size=base.config.vocab_size, hidden_size=1152, intermediate_size=3072,
                         num_hidden_layers=4, num_attention_heads=18, num_key_value_heads=6,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def run_one(model_name: str, ratio: float, inputs: str, factorization: str, windows: int,
            eval_windows: int) -> dict:
    """One compression in this process; the report's phases, per-shape factor times, perplexity."""
    import torch

    import lowrank
    from lowrank.data import perplexity

    model, tokenizer = _load(model_name)
    protocol = {**austen512.PROTOCOL, "calib_windows": windows, "eval_windows": max(eval_windows, 1)}
    calib, evaluation = austen512.windows("smollm2-135m" if model_name == "wide" else model_name, tokenizer, protocol)
    recipe = lowrank.Recipe(ratio=ratio, inputs=inputs, factorization=factorization, device="cpu",
                            seed=austen512.PROTOCOL["seed"])
    report = lowrank.compress(model, recipe, calib, batch_size=8, progress=False)
    shapes: dict[str, list[float]] = {}
    for m in report.matrices:
        shapes.setdefault(f"{m.shape[0]}x{m.shape[1]}", []).append(m.factorization_seconds)
    row = {"model": model_name, "ratio": ratio, "inputs": inputs, "factorization": factorization,
           "windows": windows, "timings": report.timings, "notes": report.notes,
           "threads": torch.get_num_threads(), "ratio_achieved": report.ratio_achieved,
           "per_shape": {k: {"count": len(v), "seconds": sum(v)} for k, v in shapes.items()},
           "methods": sorted({m.factorization for m in report.matrices})}
    if eval_windows:
        row["perplexity"] = perplexity(model, evaluation, batch_size=8, progress=False).perplexity
    return row


def _spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "one", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run {args} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    m = austen512.machine()
    row["cpu"] = f"{m['cpu']} ({m['cores']} cores)"   # a row rerun on another machine says so
    return row


def floor(t: dict) -> float:
    """The work no implementation can skip, timed in the same run."""
    return t.get("forward", 0.0) + t.get("statistics", 0.0) + t.get("forward_next", 0.0)


def _store(name: str, section: str, rows: list[dict]) -> dict:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"machine": austen512.machine()}
    data[section] = rows
    path.write_text(json.dumps(data, indent=2))
    return data


def _merge(name: str, section: str, row: dict, key: tuple[str, ...]) -> list[dict]:
    """The section's stored rows with ``row`` in place of the one it repeats (same ``key`` fields),
    so a rerun of one configuration replaces only its own row."""
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text()).get(section, []) if path.exists() else []
    same = [i for i, r in enumerate(rows) if all(r.get(k) == row.get(k) for k in key)]
    if same:
        rows[same[0]] = row
    else:
        rows.append(row)
    return rows


def cmd_targets(a: argparse.Namespace) -> None:
    for inputs in a.inputs:
        for ratio in a.ratios:
            for fac in a.factorizations:
                row = _spawn([a.model, str(ratio), inputs, fac, str(a.windows), str(a.eval_windows)])
                t = row["timings"]
                print(f"{inputs:>10} {ratio:.1f} {fac:>4}: total {t['total']:.1f}s floor {floor(t):.1f}s "
                      f"factorization {t.get('factorization', 0):.1f}s ppl {row.get('perplexity', float('nan')):.3f}",
                      flush=True)
                rows = _merge(a.name, "targets", row, ("inputs", "ratio", "factorization", "windows"))
                write(a.name, _store(a.name, "targets", rows))   # after every run: a cut run keeps its rows


def cmd_windows(a: argparse.Namespace) -> None:
    rows = []
    for n in a.sweep:
        rows.append(_spawn([a.model, str(a.ratio), "sequential", "auto", str(n), "0"]))
        print(f"{n} windows: {rows[-1]['timings']}", flush=True)
    write(a.name, _store(a.name, "windows", rows))


def cmd_models(a: argparse.Namespace) -> None:
    for model in a.models:
        row = _spawn([model, str(a.ratio), "sequential", "auto", str(a.windows), "0"])
        print(f"{model}: {row['timings']}", flush=True)
        write(a.name, _store(a.name, "models", _merge(a.name, "models", row, ("model",))))


def write(name: str, data: dict) -> None:
    """``<name>.md`` and ``<name>.png`` from the JSON's sections."""
    m = data["machine"]
    lines = [f"# Compression speed: {name}", "",
             f"Machine: {m.get('gpu', 'no GPU')}; {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB); torch {m['torch']}.",
             "SmolLM2-135M unless stated, whitening + uniform, calibration windows of 512 tokens from emma (seed 3).",
             "floor = forward + statistics (+ forward_next for sequential inputs), timed in the same run.", ""]
    if "targets" in data:
        lines += ["| inputs | ratio | factorization | windows | total s | floor s | total / floor | factor s | factor / total | perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["targets"]:
            t = r["timings"]
            lines.append(f"| {r['inputs']} | {r['ratio']:.1f} | {r['factorization']} | {r['windows']} | {t['total']:.1f} | "
                         f"{floor(t):.1f} | {t['total'] / floor(t):.3f} | {t.get('factorization', 0):.1f} | "
                         f"{t.get('factorization', 0) / t['total']:.3f} | "
                         f"{format(r['perplexity'], '.3f') if 'perplexity' in r else 'not measured'} |")
        shapes: dict[tuple[str, str], list[float]] = {}
        for r in data["targets"]:
            for shape, v in r["per_shape"].items():
                shapes.setdefault((shape, r["factorization"]), []).append(v["seconds"] / v["count"])
        lines += ["", "Seconds per matrix (SVD + factors), mean over the runs above:", "",
                  "| shape | " + " | ".join(sorted({f for _, f in shapes})) + " |",
                  "|---|" + "---|" * len({f for _, f in shapes})]
        for shape in sorted({s for s, _ in shapes}):
            cells = [f"{sum(v) / len(v):.3f}" if (v := shapes.get((shape, f))) else "" for f in sorted({f for _, f in shapes})]
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    for section, key in (("windows", "windows"), ("models", "model")):
        if section in data:
            lines += ["", f"## Time against {section}", "", "| " + key + " | " + " | ".join(PHASES) + " | total |",
                      "|---|" + "---|" * (len(PHASES) + 1)]
            for r in data[section]:
                t = r["timings"]
                lines.append(f"| {r[key]} | " + " | ".join(f"{t.get(p, 0):.1f}" for p in PHASES) + f" | {t['total']:.1f} |")
    if data.get("notes"):   # what the tables cannot say (the load during a row, ...), kept in the JSON
        lines += [""] + data["notes"]
    header = f"{m['cpu']} ({m['cores']} cores)"
    others = [f"{r.get('model', '')} {r.get('inputs', '')} {r['ratio']:.1f} {r['windows']} windows: {r['cpu']}"
              for sec in ("targets", "windows", "models") for r in data.get(sec, []) if r.get("cpu", header) != header]
    if others:
        lines += ["", "Rows run on another machine than the header's (each row's ratios are measured inside its own run):", ""]
        lines += [f"- {o}" for o in others]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(data, RESULTS / f"{name}.png", name)


def plot(data: dict, path: Path, title: str) -> None:
    """Stacked phases against calibration windows and against model width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("windows", "models") if s in data]
    if not sections:
        return
    fig, axes = plt.subplots(1, len(sections), figsize=(6.5 * len(sections), 4.5), squeeze=False)
    for ax, section in zip(axes[0], sections):
        rows = data[section]
        labels = [str(r["windows"] if section == "windows" else r["model"]) for r in rows]
        bottom = [0.0] * len(rows)
        for phase in PHASES:
            values = [r["timings"].get(phase, 0.0) for r in rows]
            if any(values):
                ax.bar(labels, values, bottom=bottom, label=phase)
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel("calibration windows (x 512 tokens)" if section == "windows" else "model")
        ax.set_ylabel("seconds")
        ax.set_title(f"compression time by phase, against {section}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("targets")
    t.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    t.add_argument("--inputs", nargs="+", default=["original", "sequential"])
    t.add_argument("--factorizations", nargs="+", default=["auto", "svd"])
    t.add_argument("--windows", type=int, default=128, help="calibration windows (protocol: 128)")
    t.add_argument("--eval-windows", type=int, default=0, help="perplexity on this many windows (0: skip)")
    w = sub.add_parser("windows")
    w.add_argument("--sweep", nargs="+", type=int, default=[16, 32, 64, 128])
    w.add_argument("--ratio", type=float, default=0.4)
    m = sub.add_parser("models")
    m.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "wide"])
    m.add_argument("--ratio", type=float, default=0.4)
    m.add_argument("--windows", type=int, default=16)
    sub.add_parser("plot")
    for q in (t, w, m):
        q.add_argument("--model", default="smollm2-135m")
    for q in (t, w, m, sub.choices["plot"]):
        q.add_argument("--name", default="speed-cpu")
    one = sub.add_parser("one")
    one.add_argument("args", nargs=6)
    a = p.parse_args()
    if a.command == "one":
        model, ratio, inputs, fac, windows, ev = a.args
        print(json.dumps(run_one(model, float(ratio), inputs, fac, int(windows), int(ev))))
    elif a.command == "plot":
        write(a.name, json.loads((RESULTS / f"{a.name}.json").read_text()))
    else:
        {"targets": cmd_targets, "windows": cmd_windows, "models": cmd_models}[a.command](a)


if __name__ == "__main__":
    main()
