"""Calibration modes on builtin:digits: re-running the pipeline per group (the paper's method) vs cached
block inputs propagated block by block (docs/method.md#cached-mode, the SparseGPT-style variant), for quality and time.

    python bench/calibration_modes.py [--num-images 200] [--out bench/results/calibration_modes.json] [--quick]

Same held-out prompts and seeds as bench/prune_quality.py. `rerun` re-runs the whole pipeline for every
calibration group, so later denoising steps follow the partly pruned model; `cached` runs the pipeline once
and then only each group's own blocks, on inputs that follow the dense trajectory.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory
from latency import wide_pipeline
from prune_quality import run_one

from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.eval.evaluate import EvalConfig, evaluate
from obsdiff.pruning.prune import prune_
from obsdiff.runs.loading import as_loaded, load_pipeline
from obsdiff.tables import format_table

STRUCTURED = {"sparsity_type": "structured", "sparsity": 0.3}
# (setting, label, prune keywords, calibration keywords)
CASES = [
    ("obs-diff 50 %", "rerun, 4 groups", {"sparsity": 0.5}, {}),
    ("obs-diff 50 %", "rerun, 6 groups", {"sparsity": 0.5}, {"groups": 6}),
    ("obs-diff 50 %", "cached, 4 groups", {"sparsity": 0.5}, {"mode": "cached", "groups": 4}),
    ("obs-diff 50 %", "cached, per block", {"sparsity": 0.5}, {"mode": "cached"}),
    ("obs-diff 70 %", "rerun, 4 groups", {"sparsity": 0.7}, {}),
    ("obs-diff 70 %", "cached, per block", {"sparsity": 0.7}, {"mode": "cached"}),
    ("obs-diff 2:4", "rerun, 4 groups", {"sparsity_type": "2:4"}, {}),
    ("obs-diff 2:4", "cached, per block", {"sparsity_type": "2:4"}, {"mode": "cached"}),
    ("sparsegpt 70 %", "rerun, 1 pass", {"method": "sparsegpt", "sparsity": 0.7}, {}),
    ("sparsegpt 70 %", "cached, per block", {"method": "sparsegpt", "sparsity": 0.7}, {"mode": "cached"}),
    ("structured 30 %", "rerun, 4 groups", STRUCTURED, {}),
    ("structured 30 %", "cached, per block", STRUCTURED, {"mode": "cached"}),
]
QUICK = [c for c in CASES if c[0] == "obs-diff 50 %" and c[1] in ("rerun, 4 groups", "cached, per block")]


def scaling(blocks: int, sample: int, prompts: int, steps: int) -> list[dict]:
    """Calibration time on a wider SD3-shaped random pipeline as the number of groups grows: rerun costs one
    pipeline run per group, cached one capture run plus about two passes over each block whatever the groups."""
    dense = wide_pipeline(blocks=blocks, sample=sample)
    size = {"height": sample * 8, "width": sample * 8}
    base = {"num_prompts": prompts, "steps": steps, "batch_size": 2, "guidance": 7.0} | size
    cases = [("rerun, 1 group", {"groups": 1}), ("rerun, 4 groups", {"groups": 4}),
             (f"rerun, {blocks} groups", {"groups": blocks}), ("cached, per block", {"mode": "cached"})]
    rows = []
    for label, kw in cases:
        model = as_loaded(copy.deepcopy(dense))
        t0 = time.perf_counter()
        report = prune_(model, PruneConfig(sparsity=0.5), CalibConfig(**base, **kw), progress=False)
        total = time.perf_counter() - t0
        cal = report.calibration
        rows.append({"calibration": label, "groups": len(report.groups), "seconds": total,
                     "calibration_seconds": sum(g.calib_seconds for g in report.groups),
                     "solve_seconds": sum(g.prune_seconds for g in report.groups),
                     "capture_seconds": cal.get("capture_seconds"), "advance_seconds": cal.get("advance_seconds"),
                     "cache_mib": cal["cache_bytes"] / 2**20 if "cache_bytes" in cal else None,
                     "mean_layer_error": sum(r.error or 0 for r in report.layers) / len(report.layers)})
        print(f"  wide model, {label}: {total:.1f} s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_modes.json"))
    ap.add_argument("--quick", action="store_true", help="two cases, 40 images (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (one: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else CASES
    num_images = 40 if args.quick else args.num_images
    eval_cfg = EvalConfig(num_images=num_images)
    dense = load_pipeline("builtin:digits")
    t_start = time.perf_counter()
    dense_m = evaluate(dense, None, eval_cfg, progress=False)["metrics"]
    rows = []
    for setting, label, prune_kw, calib_kw in cases:
        row = run_one(dense, f"{setting}: {label}", PruneConfig(**prune_kw), CalibConfig(**calib_kw), eval_cfg)
        rows.append(row | {"setting": setting, "mode": label})
    body = []
    for r in rows:
        cal = r["calibration"]
        cached = cal.get("mode") == "cached"
        body.append([r["setting"], r["mode"], r["groups"], r["digit_accuracy"], r["digit_confidence"],
                     r["latent_rel_mse_vs_reference"], r["mean_layer_error"], round(r["prune_seconds"], 1),
                     cal.get("captures", "") if cached else "", round(cal["cache_bytes"] / 2**20, 1) if cached else ""])
    table = format_table(["setting", "calibration", "groups", "digit_accuracy", "digit_confidence",
                          "latent_rel_mse", "mean layer error", "prune s", "pipeline runs", "cache MiB"], body)
    head = (f"Dense model: digit_accuracy {dense_m['digit_accuracy']:.3f}, digit_confidence "
            f"{dense_m['digit_confidence']:.3f} ({num_images} images). Calibration 64 prompts x 20 steps, "
            f"batch 16; {args.threads} thread(s), {time.strftime('%Y-%m-%d')}. `pipeline runs`: cached mode's "
            "capture passes (rerun mode runs the pipeline once per group).")
    wide = {"blocks": 2, "sample": 8, "prompts": 2, "steps": 2} if args.quick else \
        {"blocks": 12, "sample": 32, "prompts": 4, "steps": 10}
    scale_rows = scaling(**wide)
    scale_table = format_table(
        ["calibration", "groups", "prune s", "calibration s", "capture s", "advance s", "OBS solve s", "cache MiB",
         "mean layer error"],
        [[r["calibration"], r["groups"], round(r["seconds"], 1), round(r["calibration_seconds"], 1),
          round(r["capture_seconds"], 1) if r["capture_seconds"] is not None else "",
          round(r["advance_seconds"], 1) if r["advance_seconds"] is not None else "", round(r["solve_seconds"], 1),
          round(r["cache_mib"], 1) if r["cache_mib"] is not None else "", r["mean_layer_error"]] for r in scale_rows])
    scale_head = (f"**Time as groups grow**: SD3-shaped random pipeline, hidden 512, {wide['blocks']} blocks, "
                  f"{wide['sample']}x{wide['sample']} latents ({wide['sample'] * 8} px), {wide['prompts']} prompts x "
                  f"{wide['steps']} steps, CFG, obs-diff 50 %. `calibration s` includes capture and advance.")
    text = head + "\n\n" + table + "\n\n" + scale_head + "\n\n" + scale_table
    print("\n" + text)
    save_results(args.out, text, {"num_images": num_images, "dense": dense_m, "rows": rows, "wide": wide,
                                  "scaling": scale_rows}, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
