"""An independent, plain reimplementation of SVD-LLM(W) whitening, to check the pipeline against.

It shares no code with lowrank's pipeline (only the model loader, the AUSTEN windows and the
perplexity function): one forward pass of the ORIGINAL model with hooks accumulating each linear
layer's X X^T (SVD-LLM profiles every layer before compressing any), then per layer, as in
SVD-LLM's `SVDLLM.py`: Cholesky of X X^T in float64, on failure add (-lambda_min + 1e-6) I and
retry; SVD of W S in float32; keep k = int(m n (1 - r) / (m + n)); W' = U_k S_k V_k^T S^-1.

    python bench/svdllm_reference.py --ratios 0.2 0.4 0.6 --device cuda

It prints, per ratio, its perplexity and lowrank's with `inputs: original` (the same mathematics;
lowrank factors in float64 with relative jitter, so small differences are expected, large ones
would be a bug) and with the default `inputs: sequential`, and writes bench/results/svdllm-reference.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from austen512 import PROTOCOL, machine, windows  # noqa: E402


def svdllm_whitening(model, calib, ratio: float, device) -> None:
    layers = model.model.layers
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    grams, hooks = {}, []
    for i, layer in enumerate(layers):
        for n in names:
            mod = layer.get_submodule(n)
            key = (i, n)
            grams[key] = torch.zeros(mod.in_features, mod.in_features, device=device)

            def hook(m, args, out, key=key):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                grams[key] += x.T @ x
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for b in calib.split(8):
            model(input_ids=b.to(device), use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for (i, n), g in grams.items():
            mod = layers[i].get_submodule(n)
            w = mod.weight.float()
            g = g.double()
            try:
                s = torch.linalg.cholesky(g)
            except RuntimeError:
                eig = torch.linalg.eigvalsh(g)
                g = g + (-eig[0] + 1e-6) * torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
                s = torch.linalg.cholesky(g)
            s = s.float()
            u, sig, vt = torch.linalg.svd(w @ s, full_matrices=False)
            m_, n_ = w.shape
            k = int(m_ * n_ * (1 - ratio) / (m_ + n_))
            w_new = (u[:, :k] * sig[:k]) @ vt[:k] @ torch.linalg.inv(s)
            mod.weight.copy_(w_new.to(mod.weight.dtype))


def main() -> None:
    import lowrank
    import lowrank.data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--device", default="auto")
    p.add_argument("--calib-windows", type=int, default=PROTOCOL["calib_windows"])
    p.add_argument("--eval-windows", type=int, default=PROTOCOL["eval_windows"])
    args = p.parse_args()
    from lowrank import resolve_device

    device, _ = resolve_device(args.device)
    protocol = {**PROTOCOL, "calib_windows": args.calib_windows, "eval_windows": args.eval_windows}
    model, tok = lowrank.data.load_model("smollm2-135m")
    calib, evaluation = windows("smollm2-135m", tok, protocol)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for ratio in args.ratios:
        row = {"ratio": ratio}
        for label in ("svdllm-reference", "lowrank original", "lowrank sequential"):
            model.load_state_dict(state)
            model.to(device)
            t0 = time.perf_counter()
            if label == "svdllm-reference":
                svdllm_whitening(model, calib, ratio, device)
                test = model
            else:
                test, _ = lowrank.data.load_model("smollm2-135m")
                test.to(device)
                inputs = label.split()[1]
                lowrank.compress(test, lowrank.Recipe(scalings=["whitening"], ratio=ratio, inputs=inputs,
                                                      device=str(device)), calib, progress=False)
            seconds = time.perf_counter() - t0
            ppl = lowrank.data.perplexity(test, evaluation, batch_size=8, device=device, progress=False).perplexity
            row[label] = ppl
            row[label + " s"] = seconds
            print(f"ratio {ratio}: {label:<20} ppl {ppl:.3f} ({seconds:.1f}s)", flush=True)
        rows.append(row)
    info = machine()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "svdllm-reference.json").write_text(json.dumps({"protocol": protocol, "machine": info, "rows": rows}, indent=2))
    lines = ["# SVD-LLM(W) reference vs lowrank whitening (AUSTEN-512, SmolLM2)", "",
             f"Machine: {info.get('gpu', 'no GPU')}; torch {info['torch']}, transformers {info['transformers']}. "
             f"Calibration {protocol['calib_windows']}x{protocol['seqlen']} (emma, seed 3); evaluation {protocol['eval_windows']}x512 (prideprejudice).",
             "", "`svdllm-reference`: bench/svdllm_reference.py, an independent plain implementation of SVD-LLM's "
             "algorithm (original-model activations, float32 SVD). `lowrank original`: the pipeline with "
             "`inputs: original` (the same mathematics). `lowrank sequential`: the default, each block calibrated "
             "on the already-compressed model's activations.", "",
             "| ratio | svdllm-reference | lowrank original | relative gap | lowrank sequential |", "|---|---|---|---|---|"]
    for r in rows:
        gap = r["lowrank original"] / r["svdllm-reference"] - 1
        lines.append(f"| {r['ratio']:.1f} | {r['svdllm-reference']:.3f} | {r['lowrank original']:.3f} | {gap:+.2%} | {r['lowrank sequential']:.3f} |")
    (out / "svdllm-reference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
