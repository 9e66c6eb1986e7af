"""The compensated target's strength on AUSTEN-512: perplexity against alpha.

    python bench/compensation_table.py --name compensation-strength-cpu

Reads the AUSTEN-512 result files listed in ``RUNS`` (written by ``austen512.py`` with the full
protocol: whitening, uniform ranks, sequential inputs, ``target: compensated`` at the strength
given, or the plain target for alpha 0), and writes ``bench/results/<name>.md`` (one row per run)
and ``<name>.png`` (perplexity against alpha for each ratio, ``adaptive`` as a dashed line).

Each run is named by its file and recipe rather than read from the recipe, because
``whitening-compensated.yaml`` changed meaning: before the strength existed it ran at full
strength (alpha 1, ``compensated-protocol-cpu-0.6``); it now runs ``adaptive``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# (result stem, recipe file) -> strength; "adaptive" is SAES-SVD's ACES as we read it
RUNS: dict[tuple[str, str], float | str] = {
    ("compensated-protocol-cpu-0.6", "whitening-sequential.yaml"): 0.0,
    ("compensated-protocol-cpu-0.6", "whitening-compensated.yaml"): 1.0,
    ("compensated-strength-protocol-cpu-0.6", "whitening-compensated.yaml"): "adaptive",
    ("compensated-strength-protocol-cpu-0.6", "whitening-compensated-half.yaml"): 0.5,
    ("compensated-strength2-protocol-cpu-0.6", "whitening-compensated-quarter.yaml"): 0.25,
    ("compensated-strength2-protocol-cpu-0.6", "whitening-compensated-three-quarters.yaml"): 0.75,
    ("compensated-strength3-protocol-cpu-0.6", "whitening-compensated-eighth.yaml"): 0.125,
    ("compensated-strength-protocol-cpu-0.2", "whitening-sequential.yaml"): 0.0,
    ("compensated-strength-protocol-cpu-0.2", "whitening-compensated-quarter.yaml"): 0.25,
}
SVD_LLM = {0.2: 64.60, 0.4: 114.23, 0.6: 241.80}   # original inputs, plain target (presets-cpu.md)


def _rows() -> list[dict]:
    rows = []
    for (stem, recipe), strength in RUNS.items():
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for r in data["rows"]:
            if Path(r["recipe"]).name == recipe:
                rows.append({**r, "strength": strength, "stem": stem, "machine": data["machine"]})
    return sorted(rows, key=lambda r: (r["ratio"], str(r["strength"])))


def _markdown(rows: list[dict], name: str) -> str:
    lines = [
        f"# AUSTEN-512: the compensated target's strength ({name})",
        "",
        "Full protocol: SmolLM2-135M in float32; calibration 128 x 512 tokens of Emma (the protocol's "
        "windows, seed 3); perplexity on the first 64 windows of 512 tokens of Pride and Prejudice (P&P) "
        "and of Persuasion. Whitening, uniform ranks, `inputs: sequential`; alpha 0 is the plain target, "
        "1 full compensation (W* = W M C^-1), `adaptive` our reading of SAES-SVD's ACES. Machine: "
        "2-core CPU (stated per row). SVD-LLM (original inputs, plain target): "
        + ", ".join(f"{v} at {k}" for k, v in SVD_LLM.items()) + ".",
        "",
        "| ratio | compensation | P&P | Persuasion | compress s | peak RSS MiB | result file | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = next(iter(r.get("extra_perplexity", {}).values()), None)
        lines.append(f"| {r['ratio']:.1f} | {r['strength']} | {r['perplexity']:.2f} | "
                     f"{'' if extra is None else f'{extra:.2f}'} | {r['timings'].get('total', 0):.0f} | "
                     f"{r['compress_rss_peak_mb']:.0f} | `{r['stem']}` | {r['machine']['cpu']} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ratio in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == ratio]
        fixed = sorted((r["strength"], r["perplexity"]) for r in at if r["strength"] != "adaptive")
        line, = ax.plot([a for a, _ in fixed], [p for _, p in fixed], "o-", label=f"ratio {ratio:.1f}")
        for r in at:
            if r["strength"] == "adaptive":
                ax.axhline(r["perplexity"], color=line.get_color(), ls="--", lw=1,
                           label=f"adaptive (ACES), ratio {ratio:.1f}")
        if ratio in SVD_LLM:
            ax.axhline(SVD_LLM[ratio], color=line.get_color(), ls=":", lw=1, label=f"svd-llm, ratio {ratio:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("compensation strength alpha (0 = plain target)")
    ax.set_ylabel("perplexity, Pride and Prejudice")
    ax.set_title("Compensated target, AUSTEN-512 (whitening, uniform)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="compensation-strength-cpu")
    args = p.parse_args()
    rows = _rows()
    (RESULTS / f"{args.name}.md").write_text(_markdown(rows, args.name))
    _plot(rows, RESULTS / f"{args.name}.png")
    print(f"{len(rows)} runs -> bench/results/{args.name}.md, .png")


if __name__ == "__main__":
    main()
