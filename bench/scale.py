"""Scale: streamed compression (`lowrank.compress_checkpoint`) against the number of blocks.

    python bench/scale.py generate --root /tmp/scale            # Llama-3-8B config, bf16, 32 blocks
    python bench/scale.py run --root /tmp/scale --blocks 4 8 16 32 --name cpu
    python bench/scale.py torchrun --root /tmp/scale --name cpu  # SmolLM2: 1 process vs 2 (gloo)

`generate` writes a synthetic checkpoint with the real Llama-3-8B architecture (hidden 4096, MLP
14336, 32 heads, 8 KV heads, vocabulary 128256, untied head) and random weights in bfloat16, one
shard per block, never holding more than one block in memory; the 4-, 8- and 16-block models are
the same shards seen through their own config.json and index (symlinks), so the disk holds the
32-block model once (about 16 GB). `run` compresses each in a fresh subprocess and records its
peak resident memory, the resident memory after every block, and the time of every block.
`torchrun` compresses SmolLM2-135M with the CLI in one process and under
`torchrun --nproc-per-node 2` (gloo), then measures both outputs' perplexity with `lowrank eval`.
Results go to bench/results/scale-<name>.json/.md and a memory-vs-blocks plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=128001)
# the compression of every run: whitening + uniform ranks at 0.2 on the k and v projections (the
# 4096-wide inputs' Gram matrices and SVDs of 1024 x 4096 matrices), original inputs (one forward
# pass per block), 2 windows of 64 tokens: small enough for 2 shared CPU cores, where a bfloat16
# matmul runs about 5x slower than a float32 one (a block's forward over 512 tokens takes minutes)
RECIPE = dict(scalings=["whitening"], allocator="uniform", ratio=0.2, targets=["k_proj", "v_proj"],
              inputs="original")
CALIBRATION = dict(windows=2, seqlen=64, seed=0)


def _block_tensors(config, index: int, generator) -> dict:
    import torch

    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h), "mlp.down_proj.weight": (h, m)}
    out = {f"model.layers.{index}.{k}": (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
           for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{index}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def _write_view(root: Path, config, blocks: int) -> Path:
    """The model of the first ``blocks`` blocks: its own config and index, the shards linked."""
    full = root / "full"
    view = root / f"blocks-{blocks}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    config.num_hidden_layers = blocks
    config.save_pretrained(view)
    config.num_hidden_layers = 32
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    for name in set(keep.values()):
        (view / name).symlink_to(full / name)
    total = sum((full / n).stat().st_size for n in set(keep.values()))
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": keep}))
    return view


def generate(root: Path, blocks: int = 32) -> None:
    """The synthetic Llama-3-8B-config checkpoint and its views."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": blocks}, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    full = root / "full"
    full.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    count = blocks + 1
    weight_map = {}
    rest = {"model.embed_tokens.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=g) * 0.02).to(torch.bfloat16),
            "model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16),
            "lm_head.weight": (torch.randn(config.vocab_size, config.hidden_size, generator=g) * 0.02).to(torch.bfloat16)}
    shards = [(f"model-00001-of-{count:05d}.safetensors", lambda: rest)]
    shards += [(f"model-{i + 2:05d}-of-{count:05d}.safetensors", lambda i=i: _block_tensors(config, i, g))
               for i in range(blocks)]
    for name, make in shards:
        if (full / name).is_file():
            continue
        tensors = make()
        save_file(tensors, str(full / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"wrote {name}", file=sys.stderr, flush=True)
    if weight_map:
        total = sum((full / n).stat().st_size for n in set(weight_map.values()))
        (full / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))
    config.save_pretrained(full)
    for b in (4, 8, 16, 32):
        if b <= blocks:
            _write_view(root, config, b)


def _child(source: str, out: str) -> None:
    """One streamed compression; prints a JSON line with the peak RSS and the per-block trace."""
    import torch

    import lowrank
    from lowrank._engine.stream import StreamHooks  # the bench's probe: a timestamp per block

    trace: list[dict] = []
    leave = StreamHooks.leave
    start = time.perf_counter()

    def timed(self, index, phase, inputs):
        leave(self, index, phase, inputs)
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        trace.append({"block": index, "phase": phase, "t": time.perf_counter() - start, "rss": rss})
        with open(f"{out}.trace.jsonl", "a") as log:  # progress of a long run, kept if it is stopped
            log.write(json.dumps(trace[-1]) + "\n")

    StreamHooks.leave = timed
    g = torch.Generator().manual_seed(CALIBRATION["seed"])
    calibration = torch.randint(0, LLAMA3_8B["vocab_size"], (CALIBRATION["windows"], CALIBRATION["seqlen"]), generator=g)
    report = lowrank.compress_checkpoint(source, out, lowrank.Recipe(**RECIPE), calibration, batch_size=2,
                                         progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "trace": trace, "timings": report.timings,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "ratio_achieved": report.ratio_achieved}))


def run(root: Path, blocks: list[int], name: str) -> None:
    """Compress each view in a fresh subprocess; write the results and the plot."""
    rows = []
    for b in blocks:
        out = root / f"out-{b}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, __file__, "child", str(root / f"blocks-{b}"), str(out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["blocks"] = b
        row["output_bytes"] = sum(p.stat().st_size for p in out.iterdir())
        shutil.rmtree(out)
        rows.append(row)
        print(f"{b} blocks: {row['seconds']:.0f}s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        _write(rows, name)


def _write(rows: list[dict], name: str) -> None:
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), "
                       f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM",
            "model": "Llama-3-8B config (hidden 4096, MLP 14336, vocab 128256, untied head), random bf16 weights",
            "recipe": RECIPE, "calibration": CALIBRATION, "torch_threads": 1}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Scale: streamed compression against the number of blocks ({name})", "",
             f"Machine: {meta['machine']}; torch threads 1. Model: {meta['model']}.",
             f"Recipe: {RECIPE}. Calibration: {CALIBRATION['windows']} random windows of "
             f"{CALIBRATION['seqlen']} tokens, batch 2.", "",
             "| blocks | heap trimmed after each block | checkpoint | total s | s per block (median) | peak RSS GiB | RSS after first block GiB | RSS after last block GiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        comp = [t for t in r["trace"] if t["phase"] == "compressing"]
        times = sorted(b["t"] - a["t"] for a, b in zip(comp, comp[1:])) or [comp[0]["t"]]
        lines.append(f"| {r['blocks']} | {'yes' if r.get('malloc_trim', True) else 'no'} | "
                     f"{r['blocks'] * 0.436 + 2.1:.1f} GB | {r['seconds']:.0f} | "
                     f"{times[len(times) // 2]:.1f} | {r['peak_rss'] / 2**30:.2f} | {comp[0]['rss'] / 2**30:.2f} | "
                     f"{comp[-1]['rss'] / 2**30:.2f} |")
    lines += _torchrun_lines(RESULTS / f"scale-{name}-torchrun.json")
    (RESULTS / f"scale-{name}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, name)


def _torchrun_lines(path: Path) -> list[str]:
    """The 1-process / 2-process comparison, when it was measured."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    lines = ["", "## torchrun: one process against two (gloo), SmolLM2-135M", "",
             f"Machine: {data.get('machine', '')}. Recipe: {data.get('recipe', '')}.", "",
             "| run | perplexity | compression wall s | engine total s | forward s | factorization s |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in data["rows"].items():
        t = r.get("timings", {})
        lines.append(f"| {label} | {r['perplexity']:.4g} ({r['perplexity']:.5f}) | {r['wall_seconds']:.0f} | "
                     f"{t.get('total', 0):.0f} | {t.get('forward', 0):.0f} | {t.get('factorization', 0):.0f} |")
    lines += ["", "Commands:", ""] + [f"- {k}: `{v}`" for k, v in data.get("commands", {}).items()]
    return lines


def _plot(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for trimmed, marker in ((False, "o-"), (True, "D-")):
        sel = [r for r in rows if r.get("malloc_trim", True) == trimmed]
        if sel:
            a.plot([r["blocks"] for r in sel], [r["peak_rss"] / 2**30 for r in sel], marker,
                   label=f"peak RSS{' (heap trimmed)' if trimmed else ''}")
    xs = sorted({r["blocks"] for r in rows})
    a.plot(xs, [b * 0.436 + 2.1 for b in xs], "s--", label="checkpoint size (GB)")
    a.set_xlabel("decoder blocks"), a.set_ylabel("GiB"), a.legend(), a.set_title("memory vs model size")
    b2 = b.twinx()
    for r in rows:
        comp = [t for t in r["trace"] if t["phase"] == "compressing"]
        b.plot([t["block"] + 1 for t in comp], [t["rss"] / 2**30 for t in comp], ".-",
               label=f"{r['blocks']} blocks{', heap trimmed' if r.get('malloc_trim', True) else ''}")
    untrimmed = [r for r in rows if not r.get("malloc_trim", True)] or rows
    b2.plot([r["blocks"] for r in untrimmed], [r["seconds"] for r in untrimmed], "k^:", label="total time")
    b.set_xlabel("block"), b.set_ylabel("RSS after block (GiB)"), b2.set_ylabel("total seconds")
    b.legend(loc="lower right"), b.set_title("RSS per block; total time")
    fig.tight_layout()
    fig.savefig(RESULTS / f"scale-{name}.png", dpi=110)


TORCHRUN_ARGS = ["smollm2-135m", "--device", "cpu", "--calib", "austen:emma", "--calib-windows", "16",
                 "--seqlen", "256", "--batch-size", "4", "--json"]
EVAL_ARGS = ["--data", "austen:prideprejudice", "--windows", "8", "--seqlen", "512", "--device", "cpu", "--json"]


def torchrun_compare(root: Path, name: str) -> None:
    """SmolLM2 compressed streamed in one process and in two (torchrun, gloo); both evaluated."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = {}
    for label, launcher in (("1 process", [sys.executable, "-m", "lowrank.cli", "compress", "--stream"]),
                            ("2 processes", ["torchrun", "--nproc-per-node", "2", "-m", "lowrank.cli", "compress"])):
        out = root / f"smollm2-{label[0]}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([*launcher, *TORCHRUN_ARGS, "--out", str(out)], check=True, env=env, capture_output=True)
        wall = time.perf_counter() - start
        ev = subprocess.run([sys.executable, "-m", "lowrank.cli", "eval", str(out), *EVAL_ARGS], check=True,
                            env=env, capture_output=True, text=True)
        rows[label] = {"wall_seconds": wall, **json.loads(ev.stdout.strip().splitlines()[-1])}
        print(label, rows[label]["perplexity"], f"{wall:.0f}s", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{name}-torchrun.json").write_text(json.dumps(
        {"compress": TORCHRUN_ARGS, "eval": EVAL_ARGS, "rows": rows}, indent=2))


def main() -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--root", type=Path, required=True)
    g.add_argument("--blocks", type=int, default=32)
    r = sub.add_parser("run")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
    r.add_argument("--name", default="cpu")
    t = sub.add_parser("torchrun")
    t.add_argument("--root", type=Path, required=True)
    t.add_argument("--name", default="cpu")
    c = sub.add_parser("child")
    c.add_argument("source")
    c.add_argument("out")
    args = parser.parse_args()
    if args.cmd == "generate":
        generate(args.root, args.blocks)
    elif args.cmd == "run":
        run(args.root, args.blocks, args.name)
    elif args.cmd == "torchrun":
        torchrun_compare(args.root, args.name)
    else:
        _child(args.source, args.out)


if __name__ == "__main__":
    main()
