"""Sparse + quantized quality on builtin:digits: quantization alone, after pruning (RTN) and inside the OBS sweep.

    python bench/quant_quality.py [--num-images 200] [--out bench/results/quant_quality.json] [--quick]

Every row is pruned and/or quantized with the same calibration (the digits defaults: 64 prompts, 20 steps,
4 groups) and evaluated on the same held-out prompts and seeds as the dense model (20 steps). The goals are
checked on the numbers of the same run:
(a) 2:4 + w8a8 joint: drift <= 1.15x the drift of 2:4 alone, lower than 2:4 then w8a8 RTN, and digit accuracy
    within 0.01 of 2:4 alone;
(b) w4a16 OBS: drift <= 0.5x the drift of w4a16 RTN.
`--quick` runs the five rows the goals read, with a small calibration and 40 images (a smoke test: its verdicts
say nothing). Prints markdown and writes it, with all numbers, as JSON and .md next to each other.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory
from prune_quality import run_one

from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
from obsdiff.eval.evaluate import EvalConfig, evaluate
from obsdiff.runs.loading import load_pipeline
from obsdiff.tables import format_table

DENSE = "dense"
SPARSE = "2:4 (obs-diff)"
SPARSE_RTN = "2:4 then w8a8 rtn"
JOINT = "2:4 + w8a8 joint"
W4_RTN = "w4a16 rtn"
W4_OBS = "w4a16 obs"


def rows_spec() -> list[tuple[str, PruneConfig]]:
    """(label, prune config) of every pruned or quantized row; "none" = quantization alone."""
    def q(scheme, method, sparsity_type="none", sparsity=None):
        return PruneConfig(sparsity=sparsity, sparsity_type=sparsity_type, quant=QuantConfig(scheme, method=method))

    return [
        (SPARSE, PruneConfig(sparsity_type="2:4")),
        ("w8a8 rtn", q("w8a8", "rtn")),
        ("w8a8 obs", q("w8a8", "obs")),
        (SPARSE_RTN, q("w8a8", "rtn", "2:4")),
        (JOINT, q("w8a8", "obs", "2:4")),
        ("fp8 rtn", q("fp8", "rtn")),
        ("fp8 obs", q("fp8", "obs")),
        (W4_RTN, q("w4a16", "rtn")),
        (W4_OBS, q("w4a16", "obs")),
        ("50 % + w4a16 joint", q("w4a16", "obs", "unstructured", 0.5)),
    ]


QUICK_ROWS = (SPARSE, SPARSE_RTN, JOINT, W4_RTN, W4_OBS)
QUICK_CALIB = {"num_prompts": 16, "steps": 8, "batch_size": 16, "groups": 2}
DRIFT = "latent_rel_mse_vs_reference"


def goals(rows: dict[str, dict]) -> list[dict]:
    """The goals on this run's rows: each with its measured values, the bound and PASS/FAIL."""
    drift = {k: r[DRIFT] for k, r in rows.items()}
    acc = {k: r["digit_accuracy"] for k, r in rows.items()}
    a = {"goal": "a", "text": "2:4 + w8a8 joint: drift <= 1.15x 2:4 alone, < 2:4 then rtn, accuracy within 0.01",
         "drift_ratio_vs_2_4": drift[JOINT] / drift[SPARSE], "drift_ratio_vs_rtn": drift[JOINT] / drift[SPARSE_RTN],
         "accuracy_delta": acc[JOINT] - acc[SPARSE]}
    a["checks"] = {"drift <= 1.15x 2:4": a["drift_ratio_vs_2_4"] <= 1.15,
                   "drift < 2:4 then rtn": drift[JOINT] < drift[SPARSE_RTN],
                   "|accuracy delta| <= 0.01": abs(a["accuracy_delta"]) <= 0.01 + 1e-9}
    b = {"goal": "b", "text": "w4a16 obs: drift <= 0.5x w4a16 rtn", "drift_ratio": drift[W4_OBS] / drift[W4_RTN]}
    b["checks"] = {"drift <= 0.5x rtn": b["drift_ratio"] <= 0.5}
    for g in (a, b):
        g["verdict"] = "PASS" if all(g["checks"].values()) else "FAIL"
    return [a, b]


def goal_lines(results: list[dict]) -> list[str]:
    out = []
    for g in results:
        measured = ", ".join(f"{k} {v:.3g}" for k, v in g.items() if isinstance(v, float))
        failed = [k for k, ok in g["checks"].items() if not ok]
        out.append(f"- goal ({g['goal']}) {g['text']}: **{g['verdict']}** ({measured}"
                   + (f"; failed: {', '.join(failed)})" if failed else ")"))
    return out


def commit() -> str | None:
    """The checkout's HEAD: quantization's solver changes between commits, the numbers with it."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip() or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant_quality.json"))
    ap.add_argument("--quick", action="store_true", help="the goals' five rows, small calibration, 40 images")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    head = commit()  # the code this run imported (others may commit while it runs)
    specs = rows_spec()
    calib = CalibConfig()
    if args.quick:
        specs = [s for s in specs if s[0] in QUICK_ROWS]
        calib, args.num_images = CalibConfig(**QUICK_CALIB), 40
    eval_cfg = EvalConfig(num_images=args.num_images)
    dense = load_pipeline("builtin:digits")
    t_start = time.perf_counter()
    dense_m = evaluate(dense, None, eval_cfg, progress=False)["metrics"]
    print(f"dense: acc={dense_m['digit_accuracy']:.3f} fd={dense_m['fd_real']:.1f}", flush=True)
    rows = {DENSE: {"variant": DENSE, **dense_m, DRIFT: 0.0, "psnr_vs_reference": None, "prune_seconds": 0.0}}
    for label, cfg in specs:
        rows[label] = run_one(dense, label, cfg, calib, eval_cfg)

    results = goals(rows)
    body = [[label, r["digit_accuracy"], r[DRIFT], r["fd_real"], r["psnr_vs_reference"], r["prune_seconds"]]
            for label, r in rows.items()]
    text = "\n\n".join([
        f"builtin:digits, {args.num_images} images (same prompts and seeds for every row, 20 steps); calibration "
        f"{rows[SPARSE]['calib']['num_prompts']} prompts x {rows[SPARSE]['calib']['steps']} steps, "
        f"{rows[SPARSE]['calib']['groups']} groups. drift: latent relative MSE vs the dense model; PSNR: images vs "
        "the dense model's; prune s: calibration + solve.",
        format_table(["variant", "digit accuracy", "drift vs dense", "FD (real digits)", "PSNR vs dense (dB)",
                      "prune s"], body),
        "Goals (same run):\n\n" + "\n".join(goal_lines(results))])
    print("\n" + text)
    save_results(args.out, text, {"commit": head, "num_images": args.num_images, "quick": args.quick,
                                  "eval": asdict(eval_cfg), "calib": rows[SPARSE]["calib"], "dense": dense_m,
                                  "rows": list(rows.values()), "goals": results}, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
