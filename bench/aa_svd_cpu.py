"""A CPU-sized measurement of block-level factor training (aa-svd) on SmolLM2-135M.

    python bench/aa_svd_cpu.py --ratio 0.4 --label base --recipe '{"scalings": ["whitening"]}'
    python bench/aa_svd_cpu.py --ratio 0.4 --label aa --recipe '{"scalings": ["whitening"], "corrections": ["aa-svd"]}'

Setting (smaller than AUSTEN-512, so that it finishes on a 2-core CPU): SmolLM2-135M-Instruct in
float32; calibration 16 windows of 512 tokens drawn with seed 3 from `austen:emma`; evaluation the
first 16 non-overlapping windows of 512 tokens of `austen:prideprejudice`; compress batch size 8.
One JSON line per run is appended to --out (default bench/work/aa-svd-cpu-small.jsonl): the
recipe, perplexity, compression seconds and phase timings, peak resident memory, the aa-svd
report lines.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTING = {"model": "smollm2-135m", "calib_text": "austen:emma", "calib_windows": 16, "seqlen": 512,
           "seed": 3, "eval_text": "austen:prideprejudice", "eval_windows": 16, "batch_size": 8}


def main() -> None:
    """Run one recipe at one ratio and append its result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="the recipe as JSON (ratio and device are set here)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--label", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "work" / "aa-svd-cpu-small.jsonl")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import lowrank
    from lowrank.data import load_model, load_windows, perplexity

    model, tokenizer = load_model(SETTING["model"], dtype=torch.float32)
    calibration = load_windows(tokenizer, SETTING["calib_text"], "calibration", SETTING["calib_windows"],
                               SETTING["seqlen"], seed=SETTING["seed"])
    evaluation = load_windows(tokenizer, SETTING["eval_text"], "evaluation", SETTING["eval_windows"], SETTING["seqlen"])
    recipe = lowrank.Recipe.from_dict({**json.loads(args.recipe), "ratio": args.ratio, "device": "cpu"})
    started = time.perf_counter()
    report = lowrank.compress(model, recipe, calibration, batch_size=SETTING["batch_size"], progress=False)
    seconds = time.perf_counter() - started
    ppl = perplexity(model, evaluation, batch_size=SETTING["batch_size"], progress=False).perplexity
    result = {"label": args.label, "ratio": args.ratio, "perplexity": ppl, "compress_seconds": seconds,
              "timings": report.timings, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "ratio_achieved": report.ratio_achieved, "recipe": recipe.to_dict(), "setting": SETTING,
              "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "aa_svd": [n for n in report.notes if n.startswith("aa-svd")]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(f"{args.label} ratio {args.ratio}: perplexity {ppl:.2f}, compression {seconds:.0f}s")


if __name__ == "__main__":
    main()
