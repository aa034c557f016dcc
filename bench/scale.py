"""Real-size pruning: memory planned vs measured, Hessians per block, denoiser call and solve seconds, and which
GPU prunes which model with which flags.

    python bench/scale.py                 # everything (about an hour on a 2-core CPU, peak ~14 GB RSS)
    python bench/scale.py --quick         # planner tables and one small measured prune (the test suite)
    python bench/scale.py --skip-full     # without the SD3-Medium 24-block end-to-end prune

Random-weight pipelines with the exact published denoiser configs (`obsdiff.testing`) stand in for the real
checkpoints. Measured prunes run `obsdiff prune` in a child process; its peak RSS is the high-water mark the run
records (`obsdiff.json` -> `memory_measured`) and the prediction the memory plan it records (`memory_plan`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402

from obsdiff.config import CalibConfig, PruneConfig  # noqa: E402
from obsdiff.errors import ConfigError  # noqa: E402
from obsdiff.planning.memory import GiB  # noqa: E402
from obsdiff.tables import format_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
MODELS = ("sd3-medium", "sd3.5-large", "flux.1-dev", "sdxl")
GPUS = (24, 48, 80, 141)
# Published parameter counts of the components the denoiser does not include (bf16 on the GPU: 2 bytes each).
OTHER_PARAMS = {
    "sd3": {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656,
            "vae": 83_653_863},
    "flux": {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "vae": 83_819_683},
    "sdxl": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
}


def sized_model(name: str):
    """A planning view of `name` at full depth: the denoiser on the meta device and the real pipeline's sizes."""
    from types import SimpleNamespace

    from obsdiff.models import get_family
    from obsdiff.runs.loading import LoadedModel
    from obsdiff.testing import SIZED_MODELS, sized_denoiser

    _, family_name, _ = SIZED_MODELS[name]
    family = get_family(family_name)
    denoiser = sized_denoiser(name, device="meta", dtype=torch.bfloat16)
    pipeline = SimpleNamespace(**{family.denoiser_attr: denoiser}, vae_scale_factor=8, default_sample_size=128,
                               tokenizer=SimpleNamespace(model_max_length=77))
    weights = {k: 2 * v for k, v in OTHER_PARAMS[family_name].items()}
    weights[family.denoiser_attr] = sum(p.numel() for p in denoiser.parameters()) * 2
    return LoadedModel(ref=name, path=Path(name), pipeline=pipeline, family=family), weights


def hessians_per_block(name: str) -> dict:
    """Hessian MiB of one block (the largest), for unstructured/N:M and structured pruning, and the widths."""
    model, _ = sized_model(name)
    fam, denoiser = model.family, model.denoiser
    modules = dict(denoiser.named_modules())
    per_block, widths, structured = [], set(), []
    for block in fam.blocks(denoiser):
        units = fam.shared_input_groups(block)
        d_ins = [modules[u[0]].in_features for u in units]
        widths.update(d_ins)
        per_block.append(sum(d * d for d in d_ins) * 4)
        readers = {s.linear for g in fam.structure_groups(block) for s in g.readers}
        structured.append(sum(modules[r].in_features ** 2 for r in readers) * 4)
    return {"blocks": len(per_block), "hessian_mib_max": max(per_block) / 2**20,
            "hessian_mib_total": sum(per_block) / 2**20, "structured_hessian_mib_max": max(structured) / 2**20,
            "input_widths": sorted(widths),
            "parameters": sum(p.numel() for p in denoiser.parameters())}


# Flag sets tried in order for the GPU table: the first whose predicted peak fits is reported.
GPU_RECIPES = [
    ("defaults (4 groups)", {}, {}),
    ("--max-memory (more groups)", {}, {"choose": True}),
    ("+ --hessian-device cpu", {}, {"choose": True, "hessian_device": "cpu"}),
    ("+ --batch-size 1", {"batch_size": 1}, {"choose": True, "hessian_device": "cpu"}),
]


def gpu_table(names=MODELS) -> list[dict]:
    """For each model and GPU size, the first recipe whose planned peak fits (bf16, obs-diff 50 %, 100 prompts x
    25 steps, 1024 px, the paper's calibration) and what it predicts; `None` where nothing fits."""
    from obsdiff.planning.planner import choose_groups, plan_memory

    rows = []
    for name in names:
        model, weights = sized_model(name)
        prune = PruneConfig(sparsity=0.5)
        for gib in GPUS:
            row = {"model": name, "gpu_gib": gib, "recipe": None}
            for label, calib_kw, opts in GPU_RECIPES:
                calib = CalibConfig(**calib_kw)
                # leave 10 % of the card to the CUDA context, allocator slack and fragmentation
                budget = 0.9 * gib
                try:
                    if opts.get("choose"):
                        calib, plan = choose_groups(model, prune, calib, budget, "cuda", opts.get("hessian_device"),
                                                    weights, baseline_bytes=0)
                    else:
                        plan = plan_memory(model, prune, calib, "cuda", None, weights, baseline_bytes=0)
                        if plan.peak["cuda"] > budget * GiB:
                            continue
                except ConfigError:
                    continue
                row.update(recipe=label, groups=len(plan.groups), gpu_peak_gib=plan.peak["cuda"] / GiB,
                           host_peak_gib=plan.peak.get("cpu", 0) / GiB,
                           hessian_device=opts.get("hessian_device", "cuda"), batch_size=calib.batch_size)
                break
            rows.append(row)
    return rows


def solve_seconds_model(results: Path) -> dict | None:
    """Seconds per layer (solve + error report) as `a * d_out * d_in^2 + b * d_in^3`, fitted to
    bench/solve_widths.py's results."""
    if not results.exists():
        return None
    data = json.loads(results.read_text())
    # a layer's solve plus its error report: what a prune spends per layer besides calibration
    pts = [(r["d_out"], r["d_in"], r["seconds"]["unstructured"] + r["seconds"].get("errors", 0.0))
           for r in data.get("rows", []) if "unstructured" in r.get("seconds", {})]
    if len(pts) < 2:
        return None
    A = torch.tensor([[o * i * i, i**3] for o, i, _ in pts], dtype=torch.float64)
    y = torch.tensor([s for *_, s in pts], dtype=torch.float64)
    coef = torch.linalg.lstsq(A, y[:, None]).solution.flatten().clamp_min(0)
    return {"a": float(coef[0]), "b": float(coef[1]), "points": len(pts)}


def solve_extrapolation(names, fit: dict) -> list[dict]:
    """Predicted OBS solve seconds for a whole model (every prunable linear) from the fitted per-layer model."""
    rows = []
    for name in names:
        model, _ = sized_model(name)
        fam, denoiser = model.family, model.denoiser
        total, per_block = 0.0, []
        for block in fam.blocks(denoiser):
            t = sum(fit["a"] * lin.out_features * lin.in_features**2 + fit["b"] * lin.in_features**3
                    for lin in fam.prunable_linears(block).values())
            per_block.append(t)
            total += t
        rows.append({"model": name, "blocks": len(per_block), "solve_s_per_block_max": max(per_block),
                     "solve_min_total": total / 60})
    return rows


@torch.no_grad()
def call_seconds(name: str, dtype: torch.dtype, px: int = 256, repeats: int = 3) -> dict:
    """Seconds of one denoiser call per block at `px` (batch 2 = one prompt with CFG; Flux: 1), measured on a
    depth-1 and a depth-2 model (the difference is one block), and extrapolated to full depth."""
    from obsdiff.testing import SIZED_MODELS, sized_denoiser

    _, family_name, config = SIZED_MODELS[name]
    from obsdiff.models import get_family

    fam = get_family(family_name)
    batch = 1 if family_name == "flux" else 2
    times = {}
    for depth in (1, 2):
        kw = {"num_layers": depth} | ({"num_single_layers": 0} if family_name == "flux" else {})
        d = sized_denoiser(name, dtype=dtype, **kw)
        inputs = fam.example_inputs(d, batch=batch, height=px // 8, width=px // 8,
                                    generator=torch.Generator().manual_seed(0))
        d(**inputs, return_dict=False)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            d(**inputs, return_dict=False)
            ts.append(time.perf_counter() - t0)
        times[depth] = sorted(ts)[len(ts) // 2]
        del d
    per_block = max(times[2] - times[1], 1e-6)
    depth = config.get("num_layers", 1)
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "px": px, "batch": batch,
            "s_per_block": per_block, "s_other": max(times[1] - per_block, 0.0), "blocks": depth,
            "s_per_call_full_depth": times[1] + per_block * (depth - 1)}


def measured_prune(pipeline_dir: Path, out: Path, args: list[str], label: str) -> dict:
    """Run `obsdiff prune` in a child process; its peak RSS against the plan it recorded."""
    cmd = [sys.executable, "-m", "obsdiff", "prune", "--model", str(pipeline_dir), "--out", str(out), "--force", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err_text = err.read()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: obsdiff prune failed: {err_text.strip().splitlines()[-1:]}")
    record = json.loads((out / "obsdiff.json").read_text())
    # the child's own high-water mark (VmHWM); wait4's ru_maxrss also counts this process's RSS at fork time
    measured = record.get("memory_measured", {}).get("cpu") or usage.ru_maxrss * 1024
    predicted = record["memory_plan"]["peak"]["cpu"]
    return {"case": label, "model": str(pipeline_dir), "args": args, "seconds": seconds,
            "predicted_gib": predicted / GiB,
            "measured_gib": measured / GiB, "error": (predicted - measured) / measured,
            "calibration": record.get("calibration", {}), "total_seconds": record["total_seconds"],
            "solve_seconds": sum(r.get("solve_seconds", r["seconds"]) for r in record["layers"]),
            "peak_hessian_mib": record["peak_hessian_bytes"] / 2**20}


def dry_run_prediction(pipeline_dir: str, args: list[str]) -> float:
    """The predicted host peak (GiB) that `obsdiff prune --dry-run` gives for the same command."""
    import re

    cmd = [sys.executable, "-m", "obsdiff", "prune", "--model", pipeline_dir, "--out", "/nonexistent/x",
           "--dry-run", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return float(re.search(r"predicted peak: .*?cpu ([0-9.]+) GiB", out).group(1))


def repredict(results: Path, text: list[str]) -> list[dict]:
    """The measured cases of an earlier run with their predictions made again by today's planner."""
    measured = json.loads(results.read_text())["measured"]
    for m in measured:
        m["predicted_gib"] = dry_run_prediction(m["model"], m["args"])
        m["error"] = (m["predicted_gib"] - m["measured_gib"]) / m["measured_gib"]
    return measured


SMALL_CALIBRATION = ["--num-prompts", "1", "--steps", "2", "--height", "128", "--width", "128", "--guidance", "7"]


def full_prune(work: Path) -> dict:
    """SD3-Medium with all 24 blocks, bf16, obs-diff 50 %, the default 4 calibration groups."""
    full = build_pipeline("sd3-medium", 24, "bf16", work)
    return measured_prune(full, work / "full", ["--sparsity", "0.5", *SMALL_CALIBRATION, "--dtype", "bf16"],
                          "sd3-medium all 24 blocks, bf16, rerun 4 groups")


def build_pipeline(name: str, layers: int, dtype: str, where: Path, single: int | None = None) -> Path:
    path = where / f"{name}-{layers}-{single}-{dtype}"
    if not path.exists():
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "sized_pipeline.py"), name,
               "--layers", str(layers), "--dtype", dtype, "--out", str(path)]
        if single is not None:
            cmd += ["--single-layers", str(single)]
        subprocess.run(cmd, check=True, capture_output=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="planner tables and one small measured prune")
    ap.add_argument("--skip-full", action="store_true", help="skip the SD3-Medium 24-block prune")
    ap.add_argument("--full-only", action="store_true", help="only the SD3-Medium 24-block prune")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="where sized pipelines and runs are written")
    ap.add_argument("--repredict", action="store_true",
                    help="keep the measured prunes of --out and only redo the planner's predictions (dry runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="obsdiff-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    text = []

    hess = [{"model": m, **hessians_per_block(m)} for m in MODELS]
    text.append("Hessians (float32) per block, full depth:\n\n" + format_table(
        ["model", "parameters (B)", "blocks", "widths", "MiB per block (max)", "MiB all blocks",
         "structured MiB per block"],
        [[h["model"], h["parameters"] / 1e9, h["blocks"], " ".join(map(str, h["input_widths"])),
          h["hessian_mib_max"], h["hessian_mib_total"], h["structured_hessian_mib_max"]] for h in hess]))

    gpus = gpu_table()
    text.append("Which GPU prunes which model (planner; bf16, obs-diff 50 %, rerun, 100 prompts x 25 steps, batch 4, "
                "1024 px; 90 % of the card usable):\n\n" + format_table(
                    ["model", "GPU GiB", "flags", "groups", "GPU peak GiB", "host GiB"],
                    [[r["model"], r["gpu_gib"], r["recipe"] or "does not fit", r.get("groups"),
                      r.get("gpu_peak_gib"), r.get("host_peak_gib")] for r in gpus]))

    fit = solve_seconds_model(RESULTS.parent / "solve_widths.json")
    extrapolated = solve_extrapolation(MODELS[:3], fit) if fit else []
    if extrapolated:
        text.append("OBS solve + error-report time extrapolated from bench/results/solve_widths.json (this CPU, "
                    "one thread, 50 % unstructured):\n\n"
                    + format_table(["model", "blocks", "max s per block", "minutes, all blocks"],
                                   [[r["model"], r["blocks"], r["solve_s_per_block_max"], r["solve_min_total"]]
                                    for r in extrapolated]))

    calls, measured = [], []
    if args.repredict:
        previous = json.loads(args.out.read_text())
        calls = previous["call_seconds"]
        measured = repredict(args.out, text)
    elif args.quick:
        tiny = work / "digits"
        measured.append(measured_prune(Path("builtin:digits"), tiny, ["--sparsity", "0.5", "--num-prompts", "8",
                                                                       "--steps", "4", "--batch-size", "4"],
                                       "builtin:digits fp32"))
    elif args.full_only:
        measured.append(full_prune(work))
    else:
        for name in ("sd3-medium", "sd3.5-large", "flux.1-dev"):
            calls.append(call_seconds(name, torch.bfloat16))
        small = SMALL_CALIBRATION
        sd3 = build_pipeline("sd3-medium", 2, "bf16", work)
        cases = [
            ("sd3-medium 2 blocks, bf16, rerun 2 groups", sd3, ["--dtype", "bf16", "--groups", "2"]),
            ("sd3-medium 2 blocks, fp32, rerun 2 groups", sd3, ["--dtype", "fp32", "--groups", "2"]),
            ("sd3-medium 2 blocks, bf16, cached", sd3, ["--dtype", "bf16", "--calibration-mode", "cached"]),
        ]
        for label, path, extra in cases:
            sparsity = [] if "--sparsity-type" in extra else ["--sparsity", "0.5"]
            measured.append(measured_prune(path, work / "run", [*sparsity, *small, *extra], label))
            print(measured[-1])
        if not args.skip_full:
            measured.append(full_prune(work))
    if calls:
        text.append("Seconds per denoiser call on this CPU (one thread, bf16, 256 px, batch 2 with CFG; Flux 1):\n\n"
                    + format_table(["model", "s per block", "s other", "blocks", "s per call, full depth"],
                                   [[c["model"], c["s_per_block"], c["s_other"], c["blocks"],
                                     c["s_per_call_full_depth"]] for c in calls]))
    text.append("Predicted vs measured peak RSS (`obsdiff prune` in a child process; 1 prompt, 2 steps, 128 px):\n\n"
                + format_table(["case", "predicted GiB", "measured GiB", "error", "prune s", "solve s"],
                               [[m["case"], m["predicted_gib"], m["measured_gib"],
                                 f"{100 * m['error']:+.1f} %" if m["error"] is not None else "", m["total_seconds"],
                                 m["solve_seconds"]] for m in measured]))
    print("\n\n".join(text))
    save_results(args.out, "\n\n".join(text), {"hessians": hess, "gpu_table": gpus, "solve_fit": fit,
                                                "solve_extrapolated": extrapolated, "call_seconds": calls,
                                                "measured": measured, "quick": args.quick}, t_start)


if __name__ == "__main__":
    main()
