"""Calibration speed on builtin:digits: today's code against a baseline checkout, rerun and cached modes.

    python bench/calibration_speed.py [--baseline /tmp/obsdiff-baseline] [--repeats 3] [--num-images 100]
        [--out bench/results/calibration_speed.json] [--quick]

Each prune (obs-diff 50 %, default digits calibration: 64 prompts x 20 steps, batch 16; rerun with 4 groups,
cached with one group per block) runs in its own subprocess with one thread, the baseline and the current
code alternating (A B A B ...); the tables give medians. The baseline is a checkout of an older commit
(`git worktree add /tmp/obsdiff-baseline 7b6eeef`; made with `git archive` into a temporary directory if
missing). One extra profiled run per code and mode splits the time into denoiser forwards, Hessian
accumulation, OBS solves, the error report, prompt encoding and cache I/O (cProfile: its overhead inflates
all shares alike). Quality: each code's first pruned model is evaluated once by the current
`obsdiff.eval.evaluate` (same held-out prompts and seeds).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "7b6eeef"
MODES = {"rerun": {"groups": 4}, "cached": {"mode": "cached"}}  # labels: "rerun, 4 groups", "cached, per block"
QUICK_CALIB = {"num_prompts": 16, "steps": 6}

# cProfile (file name ending(s), function names) -> the share they measure (cumulative seconds; forwards =
# calibration - the rest)
PROFILE_PARTS = {"hessian": ("hessian.py", "add"), "solve": ("obs.py", "obs_prune"),
                 "error report": ("obs.py", "reconstruction_error"), "encode": ("calibrate.py", "encode_batches"),
                 "calibration": ("calibrate.py", "hessians"),
                 "io": (("caches.py", "calibrate.py"), ("read", "write", "append"))}  # the baseline: in calibrate.py


# ------------------------------------------------------------------------------------------ worker side


def worker(spec: dict) -> dict:
    """One prune in this process (whatever `obsdiff` PYTHONPATH selects); times, stats, optional profile."""
    import torch

    torch.set_num_threads(1)
    from obsdiff.config import CalibConfig, PruneConfig

    # The baseline commit's flat layout is tried first: the editable install would lend a baseline checkout this
    # tree's subpackages (obsdiff.pruning, ...), which do not work with its other modules.
    try:
        from obsdiff.loading import load_pipeline  # old layout
        from obsdiff.prune import prune_  # old layout
    except ModuleNotFoundError:
        from obsdiff.pruning.prune import prune_
        from obsdiff.runs.loading import load_pipeline

    model = load_pipeline("builtin:digits")
    prune_cfg, calib = PruneConfig(sparsity=0.5), CalibConfig(**spec["calib"])
    profiler = cProfile.Profile() if spec.get("profile") else None
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    report = prune_(model, prune_cfg, calib, progress=False)
    if profiler:
        profiler.disable()
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
           "encode_seconds": report.encode_seconds,
           "calibration_seconds": sum(g.calib_seconds for g in report.groups),
           "solve_seconds": sum(g.prune_seconds for g in report.groups), "groups": len(report.groups),
           "calibration": report.calibration,
           "mean_layer_error": sum(r.error or 0 for r in report.layers) / len(report.layers)}
    if profiler:
        out["profile"] = profile_split(pstats.Stats(profiler), out["seconds"])
    if spec.get("save"):
        torch.save(model.denoiser.state_dict(), spec["save"])
    return out


def profile_split(stats: pstats.Stats, total: float) -> dict:
    """Seconds per part of the prune from a cProfile run (cumulative times of the functions that do them)."""
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    for (filename, _, func), (_, _, _, cumulative, _) in stats.stats.items():
        for part, (file_end, names) in PROFILE_PARTS.items():
            if filename.endswith(file_end) and func in ((names,) if isinstance(names, str) else names):
                parts[part] += cumulative
    split = {"total": total, "encode": parts["encode"], "forwards": parts["calibration"] - parts["hessian"]
             - parts["io"], "hessian": parts["hessian"], "io": parts["io"], "solve": parts["solve"],
             "error report": parts["error report"]}
    split["other"] = total - sum(v for k, v in split.items() if k != "total")
    return split


# ------------------------------------------------------------------------------------------ driver side


def baseline_root(path: Path) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The baseline checkout, or a temporary copy of BASELINE_COMMIT when `path` does not exist."""
    if (path / "obsdiff").is_dir():
        return path, None
    tmp = tempfile.TemporaryDirectory(prefix="obsdiff-baseline-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_COMMIT], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp.name], input=archive.stdout, check=True)
    return Path(tmp.name), tmp


def run_worker(root: Path, spec: dict) -> dict:
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quality(state_file: str, dense, eval_cfg) -> dict:
    import torch

    from obsdiff.eval.evaluate import evaluate
    from obsdiff.runs.loading import load_pipeline

    model = load_pipeline("builtin:digits")
    model.denoiser.load_state_dict(torch.load(state_file, weights_only=True))
    m = evaluate(model, dense, eval_cfg, progress=False)["metrics"]
    return {k: m[k] for k in ("digit_accuracy", "digit_confidence", "latent_rel_mse_vs_reference")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", type=Path, default=Path("/tmp/obsdiff-baseline"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-images", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_speed.json"))
    ap.add_argument("--quick", action="store_true",
                    help="16 prompts x 6 steps, one (profiled) repeat, 20 images: a smoke test, not a measurement")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    torch.set_num_threads(1)
    from common import save_results  # bench/ is the script's directory

    from obsdiff.eval.evaluate import EvalConfig, evaluate
    from obsdiff.runs.loading import load_pipeline
    from obsdiff.tables import format_table

    repeats, num_images = (1, 20) if args.quick else (args.repeats, args.num_images)
    extra = QUICK_CALIB if args.quick else {}
    base, tmp = baseline_root(args.baseline)
    impls = {"baseline": base, "current": ROOT}
    t_start = time.perf_counter()
    runs: dict[tuple[str, str], list[dict]] = {(i, m): [] for i in impls for m in MODES}
    profiles, saved = {}, {}
    with tempfile.TemporaryDirectory(prefix="calibration-speed-") as work:
        for r in range(repeats):
            for mode, calib in MODES.items():
                for impl, root in impls.items():  # interleaved: baseline, current, baseline, current ...
                    spec = {"calib": calib | extra, "profile": args.quick}  # quick: no separate profiled run
                    if r == 0:
                        spec["save"] = saved[impl, mode] = f"{work}/{impl}-{mode}.pt"
                    res = run_worker(root, spec)
                    runs[impl, mode].append(res)
                    if args.quick:
                        profiles[impl, mode] = res["profile"]
                    print(f"  repeat {r + 1}/{repeats} {mode:<6} {impl:<8} {res['seconds']:.2f} s", flush=True)
        for mode, calib in MODES.items():
            for impl, root in impls.items():
                if not args.quick:
                    profiles[impl, mode] = run_worker(root, {"calib": calib | extra, "profile": True})["profile"]
        eval_cfg = EvalConfig(num_images=num_images)
        dense = load_pipeline("builtin:digits")
        dense_m = evaluate(dense, None, eval_cfg, progress=False)["metrics"]
        qualities = {key: quality(path, dense, eval_cfg) for key, path in saved.items()}
    if tmp is not None:
        tmp.cleanup()

    def med(impl, mode, key):
        return statistics.median(r[key] for r in runs[impl, mode])

    rows, body = [], []
    for mode in MODES:
        row = {"mode": mode, "groups": runs["current", mode][0]["groups"]}
        for key in ("seconds", "cpu_seconds", "calibration_seconds"):
            b, c = med("baseline", mode, key), med("current", mode, key)
            row[key] = {"baseline": b, "current": c, "ratio": c / b}
        row["repeats"] = {impl: [{k: r[k] for k in ("seconds", "cpu_seconds", "calibration_seconds")}
                                 for r in runs[impl, mode]] for impl in impls}
        row["quality"] = {impl: qualities[impl, mode] for impl in impls}
        row["mean_layer_error"] = {impl: runs[impl, mode][0]["mean_layer_error"] for impl in impls}
        row["calibration_stats"] = runs["current", mode][0]["calibration"]
        rows.append(row)
        for impl in impls:
            q = qualities[impl, mode]
            cur = impl == "current"
            body.append([mode, impl, row["groups"], round(med(impl, mode, "seconds"), 2),
                         round(med(impl, mode, "cpu_seconds"), 2), round(med(impl, mode, "calibration_seconds"), 2),
                         round(row["seconds"]["ratio"], 3) if cur else "",
                         round(row["cpu_seconds"]["ratio"], 3) if cur else "",
                         round(row["calibration_seconds"]["ratio"], 3) if cur else "",
                         q["digit_accuracy"], round(q["latent_rel_mse_vs_reference"], 5),
                         round(row["mean_layer_error"][impl], 6)])
    table = format_table(["mode", "code", "groups", "prune s", "prune CPU s", "calibration s", "prune ratio",
                          "prune CPU ratio", "calibration ratio",
                          "digit_accuracy", "latent_rel_mse", "mean layer error"], body)
    parts = ["encode", "forwards", "hessian", "io", "solve", "error report", "other", "total"]
    prof_table = format_table(["mode", "code", *[f"{p} s" for p in parts]],
                              [[mode, impl, *[round(profiles[impl, mode][p], 2) for p in parts]]
                               for mode in MODES for impl in impls])
    calib_desc = ", ".join(f"{k} {v}" for k, v in extra.items()) or "64 prompts x 20 steps, batch 16"
    head = (f"builtin:digits, obs-diff 50 %, calibration {calib_desc}; rerun 4 groups, cached one group per "
            f"block. Baseline = commit {BASELINE_COMMIT}. Medians of {repeats} interleaved run(s) per code and "
            f"mode, one thread, each prune in its own process; {time.strftime('%Y-%m-%d')}. `prune CPU s`: the "
            "process's CPU time (less sensitive than wall time to other load on a shared machine). Quality on "
            f"{num_images} images (dense: digit_accuracy {dense_m['digit_accuracy']:.3f}).")
    prof_head = ("**Where the time goes** (one cProfile run each; profiling overhead inflates all parts): "
                 "`forwards` = calibration minus Hessian accumulation and cache I/O; `error report` = the "
                 "per-layer reconstruction errors.")
    text = head + "\n\n" + table + "\n\n" + prof_head + "\n\n" + prof_table
    print("\n" + text)
    save_results(args.out, text, {"quick": args.quick, "repeats": repeats, "num_images": num_images,
                                  "baseline_commit": BASELINE_COMMIT, "dense": dense_m, "rows": rows,
                                  "profiles": [{"mode": m, "code": i, **profiles[i, m]} for m in MODES
                                               for i in impls]}, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
