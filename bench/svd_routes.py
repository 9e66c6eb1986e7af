"""The thin SVD's routes (``lowrank/_engine/svd.py``) against each other: time and error per shape,
rank and spectrum.

    python bench/svd_routes.py run --threads 1 --name svd-routes-cpu
    python bench/svd_routes.py run --threads 2 --shapes 576x1536 --no-smollm2 --name svd-routes-cpu  # adds rows
    python bench/svd_routes.py run --threads 1 --spectra gapped --no-smollm2 --name svd-routes-cpu    # redoes rows
    python bench/svd_routes.py render --name svd-routes-cpu

What is timed is ``thin_svd`` itself (its ``seconds``), by method:

- ``svd``: LAPACK's SVD (gesdd) in float64; once per shape (it does not depend on the rank; a run
  that redoes some spectra keeps the time already recorded for the shape);
- ``gram-eigh``: the Gram route without its check; once per shape and spectrum;
- ``randomized``: what ``factorization: randomized`` does at each rank k <= min(m, n) / 4 (above
  it the method is ``auto``): the Gram matrix, its eigenvalues, the plan, then either the range
  finder and its check or the Gram route's eigenvectors. The route it took is recorded.

The ranks are ``uniform_rank(shape, ratio)`` for the ratios 0.2, 0.4, 0.6 and 0.8. The matrices
(float64) are W = U diag(s) V^T on orthonormal bases (DCT-II columns with random signs and a random
row order: exactly orthonormal, cheap to build at 4096 x 14336; the range finder's Gaussian draw
makes its behaviour independent of the bases) with the spectra

- ``whitened-like``: the spectrum of SmolLM2-135M's whitened ``down_proj`` of block 10 (Cholesky
  whitening on 4 x 256 tokens of ``pydoc``), stretched to min(m, n) values: how scaled LLM weights decay;
- ``gapped``: rank k_0.8 (the kept rank at ratio 0.8) with values log-uniform in [0.1, 1], then a
  tail from 1e-3 down to 5e-4: low rank plus noise, the gap at the rank kept at 0.8;

and ``flat``, a Gaussian matrix (Marchenko-Pastur spectrum: no gap anywhere). The error is against
the exact SVD of the construction (against LAPACK for the Gaussian and the SmolLM2 matrices): the
largest relative error of the k leading singular values, and ||W_k - W_k^ref||_F / ||W_k^ref||_F
of the rank-k truncation. ``--smollm2`` (the default) also runs the seven whitened matrices of
SmolLM2's block 10 themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import austen512  # noqa: E402  (the machine description)

RESULTS = HERE / "results"
RATIOS = (0.2, 0.4, 0.6, 0.8)
SHAPES = ("576x1536", "4096x4096", "4096x14336")
SPECTRA = ("whitened-like", "gapped", "flat")
FLAT_MAX = 4096 * 4096   # the Gaussian matrix only up to this size (it is refused like whitened-like)


def _basis(rows: int, cols: int, g):
    """``cols`` orthonormal columns of length ``rows``: DCT-II vectors, random signs, rows shuffled."""
    import torch

    i = torch.arange(rows, dtype=torch.float64)[:, None] + 0.5
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * i * j / rows) * math.sqrt(2.0 / rows)
    c[:, 0] /= math.sqrt(2.0)
    signs = torch.randint(0, 2, (cols,), generator=g).to(torch.float64) * 2 - 1
    return (c * signs)[torch.randperm(rows, generator=g)]


def _stretched(profile, r: int):
    """``profile`` (descending, normalized) resampled to r values, log-linearly in i / r."""
    import torch

    x = torch.linspace(0, profile.numel() - 1, r, dtype=torch.float64)
    lo = x.floor().long().clamp_max(profile.numel() - 2)
    t = x - lo
    logs = profile.clamp_min(1e-300).log()
    return torch.exp(logs[lo] * (1 - t) + logs[lo + 1] * t)


def _spectrum(kind: str, shape: tuple[int, int], profile, g):
    import torch

    import lowrank

    r = min(shape)
    if kind == "whitened-like":
        return _stretched(profile / profile[0], r)
    k = lowrank.uniform_rank(shape, 0.8)
    signal = torch.exp(-math.log(10.0) * torch.rand(k, generator=g, dtype=torch.float64)).sort(descending=True).values
    signal[0] = 1.0
    return torch.cat([signal, torch.linspace(1e-3, 5e-4, r - k, dtype=torch.float64)])


def _truncation_error(a, b, k: int) -> float:
    """||A_k - B_k||_F / ||B_k||_F for two (u, s, vh) triples, in row blocks (no m x n temporary pair)."""
    num = den = 0.0
    (ua, sa, va), (ub, sb, vb) = a, b
    la, lb = ua[:, :k] * sa[:k], ub[:, :k] * sb[:k]
    for start in range(0, la.shape[0], 512):
        x = la[start:start + 512] @ va[:k]
        y = lb[start:start + 512] @ vb[:k]
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _errors(out, ref, k: int) -> dict:
    u, s, vh = ref
    sigma = float(((out.s[:k] - s[:k]).abs() / s[:k]).max())
    return {"sigma_rel": sigma, "truncation_rel": _truncation_error((out.u, out.s, out.vh), ref, k)}


def _whitened_block(layer_index: int = 10) -> tuple[dict, object]:
    """SmolLM2-135M's matrices of one block, whitened on 4 x 256 tokens of pydoc (float64)."""
    import torch

    from lowrank import LayerStats
    from lowrank.data import load_model, load_windows
    from lowrank_builtin import Whitening

    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    windows = load_windows(tokenizer, "pydoc", "calibration", 4, 256, seed=0)
    layer = model.model.layers[layer_index]
    modules = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for w in windows:
            model(w[None] if w.dim() == 1 else w)
    for h in handles:
        h.remove()
    tokens = sum(int(w.numel()) for w in windows)
    scaled = {}
    for name, module in modules.items():
        w = module.weight.detach().double()
        (t,) = Whitening().fit_batch([(w, LayerStats(grams[name], tokens), None)])
        scaled[name.split(".")[-1]] = t.apply(w)
    return scaled, torch.linalg.svdvals(scaled["down_proj"])


def _time(w, k: int | None, method: str):
    """The result and the fastest of a few runs (one for the large matrices: the others ran beside
    a background job, so the minimum is the least disturbed)."""
    from lowrank._engine.svd import thin_svd

    runs = [thin_svd(w, k, method) for _ in range(3 if w.numel() < 10**7 else 1)]
    return runs[-1], min(out.seconds for out in runs)


def run_shape(shape: tuple[int, int], profile, threads: int, kinds: list[str],
              lapack_seconds: float | None) -> list[dict]:
    import torch

    import lowrank
    from lowrank._engine import svd as routes

    m, n = shape
    r = min(shape)
    g = torch.Generator().manual_seed(0)
    rows = []
    for kind in kinds:
        if kind == "flat" and m * n > FLAT_MAX:
            continue
        if kind == "flat":
            w = torch.randn(m, n, generator=g, dtype=torch.float64)
            ref = None
        else:
            s = _spectrum(kind, shape, profile, g)
            u, v = _basis(m, r, g), _basis(n, r, g)
            w = (u * s) @ v.T
            ref = (u, s, v.T)
        if lapack_seconds is None or ref is None:
            lapack, seconds = _time(w, None, "svd")
            lapack_seconds = lapack_seconds or seconds
            if ref is None:
                ref = (lapack.u, lapack.s, lapack.vh)
            del lapack
        gram, gram_seconds = _time(w, None, "gram-eigh")
        for ratio in RATIOS:
            k = lowrank.uniform_rank(shape, ratio)
            row = {"threads": threads, "shape": f"{m}x{n}", "spectrum": kind, "ratio": ratio, "k": k,
                   "svd_s": lapack_seconds, "gram_eigh_s": gram_seconds,
                   "gram_eigh_err": _errors(gram, ref, k), "eligible": routes._worth_trying(shape, k)}
            if row["eligible"]:
                out, seconds = _time(w, k, "randomized")
                sigma = torch.linalg.eigvalsh(routes._gram(w)).flip(0).clamp_min(0).sqrt()
                plan = routes._randomized_plan(sigma, k, shape)
                row.update(randomized_s=seconds, route=out.method, notes=out.notes,
                           plan=None if plan is None else {"block": plan.block, "iterations": plan.iterations},
                           randomized_err=_errors(out, ref, k) if out.method == "randomized" else None)
                del out
            rows.append(row)
            print(json.dumps(row), flush=True)
        del gram, w, ref
    return rows


def run_smollm2(threads: int, scaled: dict) -> list[dict]:
    import torch

    import lowrank
    from lowrank._engine import svd as routes

    rows = []
    for name, w in scaled.items():
        shape = tuple(w.shape)
        lapack, lapack_seconds = _time(w, None, "svd")
        ref = (lapack.u, lapack.s, lapack.vh)
        for ratio in RATIOS:
            k = lowrank.uniform_rank(shape, ratio)
            auto, auto_seconds = _time(w, k, "auto")
            row = {"threads": threads, "matrix": name, "shape": f"{shape[0]}x{shape[1]}", "ratio": ratio, "k": k,
                   "svd_s": lapack_seconds, "auto_s": auto_seconds, "auto_route": auto.method,
                   "eligible": routes._worth_trying(shape, k)}
            if row["eligible"]:
                out, seconds = _time(w, k, "randomized")
                sigma = torch.linalg.eigvalsh(routes._gram(w)).flip(0).clamp_min(0).sqrt()
                block = min(sigma.numel() - 1, 2 * k)
                row.update(randomized_s=seconds, route=out.method, notes=out.notes,
                           decay=float(sigma[block] / sigma[k - 1]),
                           randomized_err=_errors(out, ref, k) if out.method == "randomized" else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _row_order(row: dict) -> tuple:
    """The issue's shapes first, then the others by size; spectra and ratios in their order."""
    shape = row["shape"]
    place = SHAPES.index(shape) if shape in SHAPES else len(SHAPES) + min(int(x) for x in shape.split("x"))
    return row["threads"], place, shape, SPECTRA.index(row["spectrum"]), row["ratio"]


def _summary(data: dict) -> list[str]:
    """What the rows say, from the rows: where the route ran and what it saved, what it cost elsewhere."""
    min_side = data.get("min_side", 2048)
    rows = [r for r in data["shapes"] if r["eligible"] and r["threads"] == 1]
    big = [r for r in rows if min(int(x) for x in r["shape"].split("x")) >= min_side]
    used = [r for r in big if r["route"] == "randomized"]
    unused = [r for r in big if r["route"] != "randomized"]
    lines = ["## Summary (1 thread)", ""]
    for r in used:
        err = r["randomized_err"]
        lines.append(f"- {r['shape']} {r['spectrum']} at {r['ratio']:.1f} (k = {r['k']}): randomized in "
                     f"{r['randomized_s']:.1f} s against {r['gram_eigh_s']:.1f} s for gram-eigh "
                     f"({r['randomized_s'] / r['gram_eigh_s']:.2f}x) and {r['svd_s']:.1f} s for LAPACK; error "
                     f"{err['sigma_rel']:.0e} in the singular values, {err['truncation_rel']:.0e} in the truncation.")
    if unused:
        ratios = [r["randomized_s"] / r["gram_eigh_s"] for r in unused]
        lines.append(f"- Where the plan refused it ({len(unused)} rows at min(m, n) >= {min_side}: every "
                     f"whitened-like and flat spectrum, and the gapped ones at ranks inside the tail), the method "
                     f"cost {min(ratios):.2f}x to {max(ratios):.2f}x the Gram route (the eigenvalue pass).")
    small = [r for r in rows if r not in big and r["route"] == "randomized"]
    if small:
        lines.append("- Below the size threshold (the route ran, measured against gram-eigh): " + ", ".join(
            f"{r['shape']} {r['randomized_s'] / r['gram_eigh_s']:.2f}x" for r in small) + ".")
    smol = [r for r in data.get("smollm2", []) if r["eligible"]]
    if smol:
        lines.append(f"- SmolLM2's whitened matrices: no plan at any rank (sigma_(2k+1) / sigma_k from "
                     f"{min(r['decay'] for r in smol):.2f} to {max(r['decay'] for r in smol):.2f}); "
                     f"`auto` is right not to try it." if all(r["route"] != "randomized" for r in smol)
                     else "- SmolLM2's whitened matrices: the route ran on some (see the table).")
    return lines + [""]


def render(name: str) -> None:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    mach = data["machine"]
    lines = [f"# SVD routes on the CPU ({name})", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB; torch {mach['torch']} (MKL). "
             f"{data['note']}", "",
             "Seconds of `thin_svd` in float64 (`bench/svd_routes.py`, which describes the matrices). "
             "`randomized` is the method `factorization: randomized`: at k <= min(m, n) / 4 it forms the Gram "
             "matrix and its eigenvalues, plans from them, then runs the range finder and its check, or "
             "the Gram route's eigenvectors (route column); above min(m, n) / 4 it is `auto` (`-`). "
             "Errors against the exact SVD of the construction (LAPACK for `flat`): largest relative error "
             "of the k leading singular values / relative error of the rank-k truncation. "
             f"Rows marked * are below the route's size threshold (min(m, n) >= {data.get('min_side', 2048)}, "
             "set from them): there the method is `auto`; they were measured with the threshold lowered.", ""]
    lines += _summary(data)
    for threads in sorted({r["threads"] for r in data["shapes"]}):
        lines += [f"## Synthetic matrices, {threads} thread{'s' if threads > 1 else ''}", "",
                  "| shape | spectrum | ratio | k | svd s | gram-eigh s | randomized s | route (block, iterations) "
                  "| randomized / gram-eigh | error gram-eigh | error randomized |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
        for r in (r for r in data["shapes"] if r["threads"] == threads):
            ge = r["gram_eigh_err"]
            cells = [r["shape"], r["spectrum"], f"{r['ratio']:.1f}", str(r["k"]), f"{r['svd_s']:.2f}",
                     f"{r['gram_eigh_s']:.2f}"]
            if r["eligible"]:
                plan = r["plan"]
                route = r["route"] + (f" ({plan['block']}, {plan['iterations']})" if plan else " (no plan)")
                if min(int(x) for x in r["shape"].split("x")) < data.get("min_side", 2048):
                    route += " *"
                if r["notes"]:
                    route += ", rejected by the check"
                err = r["randomized_err"]
                cells += [f"{r['randomized_s']:.2f}", route, f"{r['randomized_s'] / r['gram_eigh_s']:.2f}",
                          f"{ge['sigma_rel']:.0e} / {ge['truncation_rel']:.0e}",
                          f"{err['sigma_rel']:.0e} / {err['truncation_rel']:.0e}" if err else ""]
            else:
                cells += ["-", "-", "", f"{ge['sigma_rel']:.0e} / {ge['truncation_rel']:.0e}", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data.get("smollm2"):
        lines += ["## SmolLM2-135M, block 10, whitened (1 thread)", "",
                  "decay: sigma_{2k+1} / sigma_k, what the plan sees with a block of 2k.", "",
                  "| matrix | shape | ratio | k | svd s | auto s (route) | randomized s | route | decay |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in data["smollm2"]:
            cells = [r["matrix"], r["shape"], f"{r['ratio']:.1f}", str(r["k"]), f"{r['svd_s']:.3f}",
                     f"{r['auto_s']:.3f} ({r['auto_route']})"]
            if r["eligible"]:
                cells += [f"{r['randomized_s']:.3f}", r["route"] + (", rejected" if r["notes"] else "") + " *",
                          f"{r['decay']:.2f}"]
            else:
                cells += ["-", "-", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--shapes", nargs="+", default=list(SHAPES))
    r.add_argument("--spectra", nargs="+", default=list(SPECTRA))
    r.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2's own whitened matrices")
    r.add_argument("--note", default="", help="stated in the results (e.g. what else ran on the machine)")
    sub.add_parser("render")
    for q in sub.choices.values():
        q.add_argument("--name", default="svd-routes-cpu")
    a = p.parse_args()
    if a.command == "run":
        import torch

        from lowrank._engine import svd as routes

        min_side = routes._MIN_SIDE
        # measure the route below its size threshold too (the threshold comes from these rows)
        routes._MIN_SIDE = 64

        torch.set_num_threads(a.threads)
        path = RESULTS / f"{a.name}.json"
        data = json.loads(path.read_text()) if path.exists() else {"shapes": [], "smollm2": []}
        data["machine"], data["note"] = austen512.machine(), a.note or data.get("note", "")
        data["min_side"] = min_side
        started = time.perf_counter()
        scaled, profile = _whitened_block()
        if not a.no_smollm2:
            data["smollm2"] = run_smollm2(a.threads, scaled)
        for spec in a.shapes:
            m, n = (int(x) for x in spec.split("x"))
            same = [row for row in data["shapes"] if (row["threads"], row["shape"]) == (a.threads, spec)]
            rows = run_shape((m, n), profile, a.threads, a.spectra, same[0]["svd_s"] if same else None)
            redone = {(row["shape"], row["spectrum"]) for row in rows}
            kept = [row for row in data["shapes"]
                    if row["threads"] != a.threads or (row["shape"], row["spectrum"]) not in redone]
            data["shapes"] = sorted(kept + rows, key=_row_order)
            path.write_text(json.dumps(data, indent=1))
        print(f"{time.perf_counter() - started:.0f} s", flush=True)
        path.write_text(json.dumps(data, indent=1))
    render(a.name)


if __name__ == "__main__":
    main()
