"""Structured pruning on builtin:digits: L1 vs OBS-Diff (exact cost) vs OBS-Diff (reference approximations).

    python bench/structured_quality.py [--num-images 200] [--out bench/results/structured_quality.json] [--quick]

Rows: method; columns: fraction of heads and FFN neurons removed per block. Quality on the same held-out
prompts and seeds as the dense model (20 steps), parameters and FLOPs per denoiser forward, and PyTorch
CPU latency of one denoiser forward (batch 32 = 16 images with CFG), median over interleaved iterations.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory

from obsdiff.config import PruneConfig
from obsdiff.eval.evaluate import EvalConfig, evaluate
from obsdiff.pruning.prune import prune_
from obsdiff.runs.loading import load_pipeline
from obsdiff.tables import format_table

VARIANTS = [
    ("L1 (magnitude)", {"method": "magnitude"}),
    ("obs-diff, exact cost", {"method": "obs-diff", "structure_cost": "exact", "joint_scoring": "sum"}),
    ("obs-diff, reference approx.", {"method": "obs-diff", "structure_cost": "diag", "joint_scoring": "rrf"}),
    ("obs-diff, exact, sensitivity alloc.", {"method": "obs-diff", "allocation": "sensitivity"}),
]


@torch.no_grad()
def interleaved_latency(denoisers: dict, inputs: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per forward for each denoiser, measured round-robin so load changes hit all alike."""
    for d in denoisers.values():
        for _ in range(warmup):
            d(**inputs, return_dict=False)
    times = {k: [] for k in denoisers}
    for _ in range(iters):
        for k, d in denoisers.items():
            t0 = time.perf_counter()
            d(**inputs, return_dict=False)
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/results/structured_quality.json"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    ratios = [0.1, 0.2, 0.3, 0.4]
    if args.quick:
        ratios, args.num_images, args.iters = [0.3], 40, 5
    eval_cfg = EvalConfig(num_images=args.num_images)
    dense = load_pipeline("builtin:digits")
    t_start = time.perf_counter()
    dense_m = evaluate(dense, None, eval_cfg, progress=False)["metrics"]
    rows, denoisers = [], {"dense": dense.denoiser}
    for ratio in ratios:
        for label, kw in VARIANTS:
            model = load_pipeline("builtin:digits")
            t0 = time.perf_counter()
            report = prune_(model, PruneConfig(sparsity_type="structured", sparsity=ratio, **kw), progress=False)
            seconds = time.perf_counter() - t0
            m = evaluate(model, dense, eval_cfg, progress=False)["metrics"]
            stats = report.model_stats
            key = f"{label} @ {int(ratio * 100)} %"
            denoisers[key] = model.denoiser
            rows.append({"variant": label, "ratio": ratio, "key": key, "prune_seconds": seconds,
                         **{k: m[k] for k in ("digit_accuracy", "digit_confidence", "fd_real",
                                              "latent_rel_mse_vs_reference", "psnr_vs_reference")},
                         "parameters": stats["after"]["parameters"], "parameter_ratio": stats["parameter_ratio"],
                         "flops": stats["after"]["flops_per_forward"], "flop_ratio": stats["flop_ratio"]})
            print(f"  {key:<36} acc={m['digit_accuracy']:.3f} fd={m['fd_real']:.1f} "
                  f"drift={m['latent_rel_mse_vs_reference']:.4f} params={stats['parameter_ratio']:.3f} "
                  f"flops={stats['flop_ratio']:.3f} ({seconds:.1f} s)", flush=True)

    inputs = dense.family.example_inputs(dense.denoiser, batch=32, text_len=16,
                                         generator=torch.Generator().manual_seed(0))
    times = interleaved_latency(denoisers, inputs, warmup=3, iters=args.iters)
    dense_ms = statistics.median(times["dense"]) * 1e3
    for r in rows:
        r["latency_ms"] = statistics.median(times[r["key"]]) * 1e3
        r["latency_ratio"] = r["latency_ms"] / dense_ms

    cols = [f"{int(r * 100)} %" for r in ratios]
    sections = [f"Dense: digit_accuracy {dense_m['digit_accuracy']:.3f}, fd_real {dense_m['fd_real']:.1f}, "
                f"{dense.denoiser.num_parameters() / 1e6:.2f} M parameters, denoiser forward (batch 32) "
                f"{dense_ms:.2f} ms median."]
    for key in ("digit_accuracy", "digit_confidence", "fd_real", "latent_rel_mse_vs_reference", "parameter_ratio",
                "flop_ratio", "latency_ratio", "prune_seconds"):
        body = [[label, *[next(r[key] for r in rows if r["variant"] == label and f"{int(r['ratio'] * 100)} %" == c)
                          for c in cols]] for label, _ in VARIANTS]
        sections.append(f"**{key}**\n\n" + format_table(["method", *cols], body))
    text = "\n\n".join(sections)
    print("\n" + text)
    save_results(args.out, text, {"num_images": args.num_images, "dense": dense_m, "dense_latency_ms": dense_ms,
                                  "rows": rows}, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
