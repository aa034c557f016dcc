"""Pruning quality on builtin:digits: methods x sparsities, N:M patterns, and a calibration-group ablation.

    python bench/prune_quality.py [--num-images 200] [--out bench/results/prune_quality.json] [--quick]

Every pruned model is evaluated on the same held-out prompts and seeds as the dense model (20 steps).
Prints markdown tables and writes them, with all numbers, as JSON and .md next to each other.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.eval.evaluate import EvalConfig, evaluate
from obsdiff.pruning.prune import prune_
from obsdiff.runs.loading import load_pipeline
from obsdiff.tables import format_table

# (label, method, timestep weighting); obs-diff variants use the default 4 groups.
VARIANTS = [
    ("magnitude", "magnitude", "uniform"),
    ("wanda", "wanda", "uniform"),
    ("sparsegpt", "sparsegpt", "uniform"),
    ("obs-diff (uniform)", "obs-diff", "uniform"),
    ("obs-diff (log_decrease)", "obs-diff", "log_decrease"),
]
METRICS = ["digit_accuracy", "digit_confidence", "fd_real", "latent_rel_mse_vs_reference", "psnr_vs_reference"]


def run_one(dense, label, prune_cfg, calib_cfg, eval_cfg) -> dict:
    model = load_pipeline("builtin:digits")
    t0 = time.perf_counter()
    report = prune_(model, prune_cfg, calib_cfg, progress=False)
    seconds = time.perf_counter() - t0
    m = evaluate(model, dense, eval_cfg, progress=False)["metrics"]
    row = {"variant": label, **{k: m[k] for k in METRICS}, "prune_seconds": seconds,
           "peak_hessian_mib": report.peak_hessian_bytes / 2**20, "sparsity": report.sparsity,
           "mean_layer_error": sum(r.error or 0 for r in report.layers) / len(report.layers),
           "prune": prune_cfg.to_dict(), "calib": report.calib, "calibration": report.calibration,
           "groups": len(report.groups)}
    print(f"  {label:<28} {prune_cfg.sparsity_type:<12} s={report.sparsity:.2f} acc={m['digit_accuracy']:.3f} "
          f"conf={m['digit_confidence']:.3f} fd={m['fd_real']:.1f} drift={m['latent_rel_mse_vs_reference']:.4f} "
          f"({seconds:.1f} s)", flush=True)
    return row


def table(rows, columns, key) -> str:
    """Rows = variants, columns = settings, cells = `key`."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    body = []
    for v in variants:
        cells = [next((r[key] for r in rows if r["variant"] == v and r["column"] == c), None) for c in columns]
        body.append([v, *cells])
    return format_table(["method", *columns], body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prune_quality.json"))
    ap.add_argument("--quick", action="store_true", help="two settings, 40 images (smoke test)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sparsities = [0.3, 0.5, 0.6, 0.7]
    patterns = ["2:4", "4:8"]
    groups = [1, 2, 4, 8]
    if args.quick:
        sparsities, patterns, groups, args.num_images = [0.5], ["2:4"], [1], 40
    eval_cfg = EvalConfig(num_images=args.num_images)
    dense = load_pipeline("builtin:digits")
    t_start = time.perf_counter()
    dense_m = evaluate(dense, None, eval_cfg, progress=False)["metrics"]
    print(f"dense: acc={dense_m['digit_accuracy']:.3f} conf={dense_m['digit_confidence']:.3f} "
          f"fd={dense_m['fd_real']:.1f}", flush=True)

    rows = []
    for column, kw in [(f"{int(s * 100)} %", {"sparsity": s}) for s in sparsities] + \
                      [(p, {"sparsity_type": p}) for p in patterns]:
        for label, method, weighting in VARIANTS:
            row = run_one(dense, label, PruneConfig(method=method, **kw),
                          CalibConfig(timestep_weighting=weighting), eval_cfg)
            rows.append(row | {"column": column})
    ablation = []
    for g in groups:
        row = run_one(dense, f"obs-diff, {g} group(s)", PruneConfig(sparsity=0.5), CalibConfig(groups=g), eval_cfg)
        ablation.append(row | {"column": "50 %"})
    row = run_one(dense, "obs-diff, no compensation", PruneConfig(sparsity=0.5, compensate=False),
                  CalibConfig(), eval_cfg)
    ablation.append(row | {"column": "50 %"})

    unstructured = [f"{int(s * 100)} %" for s in sparsities]
    sections = [f"Dense model: digit_accuracy {dense_m['digit_accuracy']:.3f}, digit_confidence "
                f"{dense_m['digit_confidence']:.3f}, fd_real {dense_m['fd_real']:.1f} ({args.num_images} images)."]
    for key in ["digit_accuracy", "digit_confidence", "fd_real", "latent_rel_mse_vs_reference", "prune_seconds",
                "peak_hessian_mib"]:
        sections.append(f"**{key}**, unstructured\n\n" + table(rows, unstructured, key))
        sections.append(f"**{key}**, N:M\n\n" + table(rows, patterns, key))
    abl_rows = [[r["variant"], r["digit_accuracy"], r["digit_confidence"], r["fd_real"],
                 r["latent_rel_mse_vs_reference"], r["mean_layer_error"], r["prune_seconds"]] for r in ablation]
    sections.append("**Ablation at 50 % unstructured** (obs-diff, log_decrease)\n\n" + format_table(
        ["variant", "digit_accuracy", "digit_confidence", "fd_real", "latent_rel_mse", "mean layer error",
         "prune s"], abl_rows))
    text = "\n\n".join(sections)
    print("\n" + text)
    save_results(args.out, text, {"num_images": args.num_images, "dense": dense_m, "rows": rows,
                                  "ablation": ablation}, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
