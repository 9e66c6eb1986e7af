"""Offload: peak host memory of a streamed run with the calibration hidden states in memory or on disk.

    python bench/offload.py run --root /tmp/offload --windows 16 64 --name cpu

A streamed run (`lowrank.compress_checkpoint`) holds one block's weights, but the hidden states of
every calibration window (windows x tokens x hidden, and the next block's beside them with
sequential inputs) stay in memory unless `offload` keeps them in files. This bench builds a
synthetic Llama-architecture checkpoint whose hidden states are large against its blocks (hidden
1024, MLP 1024, 2 blocks, vocabulary 1024, random float32 weights), compresses it with the default
recipe (whitening + uniform at 0.2, sequential inputs) on random token windows of 512 tokens, each
configuration in a fresh subprocess, and records the peak resident memory (sampled every 5 ms by
`austen512.RSSPeak`) and the wall time. One float32 copy of the hidden states is
windows x 512 x 1024 x 4 bytes (128 MiB at 64 windows). Results: bench/results/offload-<name>.md,
.json and a plot of peak memory against windows.

    python bench/offload.py real --root /tmp/offload --name cpu

What rounding costs on a real model: SmolLM2-135M streamed with the CLI (default recipe, 16 x 256
calibration tokens of Emma) in memory and offloaded in bfloat16 and float16, then `lowrank eval` on
Pride and Prejudice (8 windows of 512); the rows join the same results file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = dict(vocab_size=1024, hidden_size=1024, intermediate_size=1024, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
MODES = ["none", "float32", "bfloat16"]
SEQLEN = 512


def generate(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    source = root / "model"
    if not (source / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).save_pretrained(source)
    return source


def child(source: str, out: str, windows: int, mode: str) -> None:
    """One compression in this process; prints a JSON line with the peak RSS and the time."""
    import torch

    sys.path.insert(0, str(HERE))
    from austen512 import RSSPeak

    import lowrank

    torch.set_num_threads(2)
    calibration = torch.randint(0, CONFIG["vocab_size"], (windows, SEQLEN), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with RSSPeak() as rss:
        report = lowrank.compress_checkpoint(source, out, lowrank.Recipe(ratio=0.2), calibration, progress=False,
                                             offload=None if mode == "none" else mode)
    print(json.dumps({"windows": windows, "offload": mode, "peak_rss_mib": rss.peak / 2**20,
                      "start_rss_mib": rss.start / 2**20, "seconds": time.perf_counter() - start,
                      "hidden_copy_mib": windows * SEQLEN * CONFIG["hidden_size"] * 4 / 2**20,
                      "timings": report.timings}))


def run(root: Path, windows: list[int], name: str) -> None:
    source = generate(root)
    rows = []
    for n in windows:
        for mode in MODES:
            out = root / f"out-{n}-{mode}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            done = subprocess.run([sys.executable, __file__, "child", str(source), str(out), str(n), mode],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    sys.path.insert(0, str(HERE))
    from austen512 import machine

    path = RESULTS / f"offload-{name}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    data = {**earlier, "machine": machine(), "config": CONFIG, "seqlen": SEQLEN, "rows": rows}
    path.write_text(json.dumps(data, indent=2))
    _write(data, name)


REAL_CALIB = ["--calib", "austen:emma", "--calib-windows", "16", "--seqlen", "256", "--batch-size", "4"]
REAL_EVAL = ["--data", "austen:prideprejudice", "--windows", "8", "--seqlen", "512", "--device", "cpu"]


def real(root: Path, name: str) -> None:
    """SmolLM2 streamed with each offload setting; perplexity of every output."""
    path = RESULTS / f"offload-{name}.json"
    sys.path.insert(0, str(HERE))
    from austen512 import machine

    data = json.loads(path.read_text()) if path.is_file() else {"rows": [], "seqlen": SEQLEN}
    data["machine"] = machine()
    data["real"] = []
    for mode in MODES:
        out = root / f"smollm2-{mode}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        extra = [] if mode == "none" else ["--offload", mode]
        start = time.perf_counter()
        subprocess.run(["lowrank", "compress", "smollm2-135m", "--stream", "--out", str(out), *REAL_CALIB, *extra,
                        "--json"], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        done = subprocess.run(["lowrank", "eval", str(out), *REAL_EVAL, "--json"], check=True, capture_output=True,
                              text=True)
        result = json.loads(done.stdout[done.stdout.index("{"):])
        data["real"].append({"offload": mode, "perplexity": result["perplexity"], "compress_seconds": seconds})
        print(data["real"][-1], flush=True)
    path.write_text(json.dumps(data, indent=2))
    _write(data, name)


def _write(data: dict, name: str) -> None:
    m = data["machine"]
    lines = [f"# Offloaded hidden states: offload-{name}", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gb')} GB); torch {m.get('torch')}.",
             "Synthetic Llama checkpoint (hidden 1024, MLP 1024, 2 blocks, vocabulary 1024, float32); "
             "`compress_checkpoint` with the default recipe (whitening + uniform 0.2, sequential inputs), "
             f"random token windows of {data['seqlen']} tokens; every row a fresh process. Peak RSS covers "
             "the whole compression (the process's import and model skeleton are in `start`).", "",
             "| windows | one float32 copy of the hidden states MiB | offload | peak RSS MiB | above start MiB | seconds |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['windows']} | {r['hidden_copy_mib']:.0f} | {r['offload']} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['start_rss_mib']:.0f} | {r['seconds']:.1f} |")
    if data.get("real"):
        lines += ["", "## What rounding costs: SmolLM2-135M", "",
                  "`lowrank compress smollm2-135m --stream [--offload MODE] " + " ".join(REAL_CALIB) + "`, then "
                  "`lowrank eval OUT " + " ".join(REAL_EVAL) + "`.", "",
                  "| offload | perplexity (Pride and Prejudice, 8 x 512) | compression wall s |", "|---|---|---|"]
        lines += [f"| {r['offload']} | {r['perplexity']:.4f} | {r['compress_seconds']:.0f} |" for r in data["real"]]
    (RESULTS / f"offload-{name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        rows = [r for r in data["rows"] if r["offload"] == mode]
        ax.plot([r["windows"] for r in rows], [r["peak_rss_mib"] for r in rows], marker="o",
                label=f"offload {mode}" if mode != "none" else "in memory")
    ax.set_xlabel(f"calibration windows of {data['seqlen']} tokens")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("Streamed compression: hidden states in memory or on disk")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"offload-{name}.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--windows", type=int, nargs="+", default=[16, 64])
    r.add_argument("--name", default="cpu")
    q = sub.add_parser("real")
    q.add_argument("--root", type=Path, required=True)
    q.add_argument("--name", default="cpu")
    c = sub.add_parser("child")
    c.add_argument("source")
    c.add_argument("out")
    c.add_argument("windows", type=int)
    c.add_argument("mode", choices=MODES)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.root, args.windows, args.name)
    elif args.cmd == "real":
        real(args.root, args.name)
    else:
        child(args.source, args.out, args.windows, args.mode)


if __name__ == "__main__":
    main()
