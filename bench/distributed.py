"""Pruning on several processes (torchrun): one vs two processes on this CPU, and the scaling model at 8 GPUs.

    python bench/distributed.py            # everything (about 11 minutes on a 2-core CPU)
    python bench/distributed.py --quick    # tiny calibration, the fp64 case only, 20 images (the test suite)

Measured: `obsdiff prune --model builtin:digits` as a child process, once plainly and once under
`python -m torch.distributed.run --standalone --nproc-per-node 2`, one thread per process, then `obsdiff eval`
of both runs against the dense model, and the two runs' weights compared tensor by tensor (and, as the yardstick,
one process at another batch size, which changes only the order in which its Hessians are summed).

Modelled: SD3-Medium and Flux.1-dev at their published sizes (meta-device denoisers from `obsdiff.testing`, as in
bench/scale.py: no weights), the paper's calibration (100 prompts x 25 steps, batch 4, 1024 px, 4 groups), for
1, 2, 4 and 8 ranks: each rank's share of the prompt batches, the bytes `obsdiff.distributed` sends (Hessian
reductions to owners, weight broadcasts from them, counted as the run report counts them), the balance of the
owners' solve cost (`assign_owners` over `solve_cost`, group by group) and the per-rank memory plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402
from scale import sized_model  # noqa: E402

from obsdiff.cli_utils import format_table  # noqa: E402
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib  # noqa: E402
from obsdiff.memory import GiB  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
# (setting, prune flags, process counts): each two-process run is compared with the setting's one-process run.
# The `batch 8` cases are one process whose Hessians are only summed in another order (batches of 8, not 16),
# compared with the same setting's one-process run: the yardstick for the two-process differences.
CASES = [
    ("obs-diff 2:4", ["--sparsity-type", "2:4"], (1, 2)),
    ("obs-diff 2:4, batch 8", ["--sparsity-type", "2:4", "--batch-size", "8"], (1,)),
    ("obs-diff 50 %", ["--sparsity", "0.5"], (1, 2)),
    ("obs-diff 50 %, batch 8", ["--sparsity", "0.5", "--batch-size", "8"], (1,)),
    ("obs-diff 50 %, fp64 Hessians", ["--sparsity", "0.5", "--solver-precision", "fp64"], (1, 2)),
]
CONTROL = {"obs-diff 2:4, batch 8": "obs-diff 2:4", "obs-diff 50 %, batch 8": "obs-diff 50 %"}
QUICK = "obs-diff 50 %, fp64 Hessians"  # the case whose masks must match exactly, even on a tiny calibration
PRUNE_ARGS = ["--model", "builtin:digits", "--device", "cpu", "--dtype", "fp32"]
# Two prompt batches, so each of the two ranks calibrates on one.
QUICK_CALIB = ["--num-prompts", "4", "--steps", "2", "--batch-size", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
MODELS = ("sd3-medium", "flux.1-dev")
WORLD_SIZES = (1, 2, 4, 8)
# A failed attempt of a measured command is rerun this often before the bench gives up (each is recorded).
ATTEMPTS = 2


def child_env() -> dict:
    """This environment without any torchrun variables (a bench started under torchrun must not leak them),
    one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    return env | {"OMP_NUM_THREADS": "1"}


def run_command(cmd: list[str], label: str) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """`cmd` to completion, retried after a failure; the last attempt, its seconds and each failure's last line."""
    failures = []
    for _ in range(ATTEMPTS):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=1200)
        seconds = time.perf_counter() - t0
        if proc.returncode == 0:
            return proc, seconds, failures
        tail = [line for line in proc.stderr.splitlines() if line.strip() and "\r" not in line][-3:]
        failures.append(f"exit {proc.returncode}: " + " / ".join(tail))
        print(f"  {label}: failed ({failures[-1]}); retrying", flush=True)
    raise RuntimeError(f"{label} failed {ATTEMPTS} times: {failures[-1]}")


def prune_run(out: Path, procs: int, args: list[str], label: str) -> dict:
    """`obsdiff prune` on `procs` processes into `out`: wall seconds and what its report says about time."""
    launcher = [*TORCHRUN, "--nproc-per-node", str(procs)] if procs > 1 else [sys.executable]
    _, wall, failures = run_command([*launcher, "-m", "obsdiff", "prune", *PRUNE_ARGS, *args, "--out", str(out),
                                     "--force"], label)
    record = json.loads((out / "obsdiff.json").read_text())
    ranks = (record["distributed"] or {}).get("ranks") or [single_rank(record)]
    return {"processes": procs, "wall_seconds": wall, "total_seconds": record["total_seconds"],
            "encode_seconds": record["encode_seconds"], "ranks": ranks,
            "bytes_communicated": sum(r["bytes_sent"] for r in ranks), "sparsity": record["sparsity"],
            "calib": record["calib"], "failed_attempts": failures}


def single_rank(record: dict) -> dict:
    """A one-process run in the shape of a distributed report's rank record."""
    groups = record["groups"]
    return {"rank": 0, "calib_seconds": sum(g["calib_seconds"] for g in groups),
            "solve_seconds": sum(g["prune_seconds"] for g in groups), "comm_seconds": 0.0,
            "units_solved": sum(len(g["units"]) for g in groups), "bytes_sent": 0}


def evaluate_run(run: Path, num_images: int, label: str) -> dict:
    """`obsdiff eval RUN --reference builtin:digits`: its metrics."""
    cmd = [sys.executable, "-m", "obsdiff", "eval", str(run), "--reference", "builtin:digits", "--num-images",
           str(num_images), "--device", "cpu", "--dtype", "fp32", "--json", "--force"]
    proc, _, _ = run_command(cmd, label)
    return json.loads(proc.stdout)["metrics"]


def run_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(run.rglob("*.safetensors")) for k, v in load_file(f).items()}


def compare_weights(one: Path, two: Path) -> dict:
    """How far two runs' weights are apart: the largest relative (Frobenius) difference of any tensor, and how
    many weights are zero in one run but not in the other."""
    a, b = run_weights(one), run_weights(two)
    if a.keys() != b.keys():
        raise RuntimeError(f"the runs {one} and {two} hold different tensors")
    rel, worst, flips = 0.0, None, 0
    for key, w in a.items():
        d = float((b[key].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30))
        if d > rel:
            rel, worst = d, key
        flips += int(((w == 0) != (b[key] == 0)).sum())
    return {"max_rel_weight_diff": rel, "worst_tensor": worst, "mask_differences": flips,
            "masks_identical": flips == 0, "weights": sum(w.numel() for w in a.values())}


def measure(work: Path, cases: list, calib_args: list[str], num_images: int) -> list[dict]:
    """Every case's runs, pruned and evaluated; each run after the first of its setting (or a control) compared
    with the one-process run it should match."""
    rows, first = [], {}
    for setting, args, counts in cases:
        for procs in counts:
            label = f"{setting}, {procs} process{'es' if procs > 1 else ''}"
            out = work / f"{''.join(c for c in setting if c.isalnum())}-{procs}"
            row = prune_run(out, procs, [*args, *calib_args], label)
            row |= {"setting": setting, "metrics": evaluate_run(out, num_images, label), "run": str(out)}
            baseline = first.get(CONTROL.get(setting, setting))
            if baseline is not None:
                row |= compare_weights(Path(baseline["run"]), out) | {"compared_with": baseline["setting"]}
            first.setdefault(setting, row)
            print(f"  {label}: {row['wall_seconds']:.1f} s wall, accuracy {row['metrics']['digit_accuracy']:.3f}, "
                  f"weight diff {row.get('max_rel_weight_diff')}", flush=True)
            rows.append(row)
    return rows


def measured_tables(rows: list[dict]) -> str:
    time_rows, rank_rows = [], []
    for r in rows:
        m = r["metrics"]
        time_rows.append([r["setting"], r["processes"], r["wall_seconds"], r["total_seconds"],
                          max(k["calib_seconds"] for k in r["ranks"]), max(k["solve_seconds"] for k in r["ranks"]),
                          r["bytes_communicated"] / 2**20, m["digit_accuracy"], m["latent_rel_mse_vs_reference"],
                          r.get("max_rel_weight_diff"), r.get("mask_differences")])
        rank_rows += [[r["setting"], r["processes"], k["rank"], k["calib_seconds"], k["solve_seconds"],
                       k["comm_seconds"], k["units_solved"], k["bytes_sent"] / 2**20] for k in r["ranks"]]
    failed = [f"- {r['setting']}, {r['processes']} processes: {f}" for r in rows for f in r["failed_attempts"]]
    failed = ("\n\nAttempts that failed and were rerun:\n\n" + "\n".join(failed)) if failed else ""
    return (format_table(["setting", "processes", "command s", "prune s (report)", "calibration s (slowest rank)",
                          "solve s (slowest rank)", "MiB communicated", "digit accuracy", "latent rel. MSE",
                          "max rel. weight diff", "mask differences"], time_rows)
            + "\n\nPer rank (the report's `distributed` record; one process: its groups' calibration and solve "
            "seconds):\n\n"
            + format_table(["setting", "processes", "rank", "calibration s", "solve s", "communication s",
                            "units solved", "MiB sent"], rank_rows) + failed)


# ------------------------------------------------------------------------------------------ scaling model

def group_units(model, prune: PruneConfig, calib: CalibConfig) -> list[list[tuple[str, ...]]]:
    """The prune's units (linears sharing one Hessian) in its calibration groups, as `obsdiff prune` splits them."""
    from obsdiff.calibrate import block_positions
    from obsdiff.prune import plan_units
    from obsdiff.records import calibration_chunks, select_blocks

    units, _ = plan_units(model, prune)
    blocks = select_blocks(model.family.blocks(model.denoiser), prune.blocks)
    positions = block_positions(blocks, [n for n, _ in model.denoiser.named_modules()])
    return calibration_chunks(units, calib.groups, lambda unit: positions[unit[0]])


def group_traffic(units: list[tuple[str, ...]], modules: dict, world_size: int) -> dict:
    """One group on `world_size` ranks: bytes of the Hessian reductions (each unit's fp32 d_in x d_in from W - 1
    ranks) and of the weight broadcasts (each pruned linear's bf16 weight to W - 1 ranks), and its solve cost
    per rank under the owners `assign_owners` picks."""
    from obsdiff.distributed import assign_owners, solve_cost

    costs = [sum(solve_cost(modules[n].in_features, modules[n].out_features) for n in unit) for unit in units]
    owners = assign_owners(costs, world_size)
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    hessian = sum(modules[unit[0]].in_features ** 2 * 4 for unit in units) * (world_size - 1)
    weights = sum(modules[n].weight.numel() * 2 for unit in units for n in unit) * (world_size - 1)
    return {"hessian_bytes": hessian, "broadcast_bytes": weights, "cost": sum(costs), "busiest": max(loads),
            "balance": max(loads) / (sum(loads) / world_size)}


def scaling_model(name: str, world_sizes=WORLD_SIZES) -> list[dict]:
    """Per world size: calibration share, bytes communicated, solve balance and the per-rank memory plan of
    pruning `name` (obs-diff 50 %, bf16 on CUDA, the paper's calibration at 1024 px)."""
    from obsdiff.planner import forward_profile, plan_memory

    model, weights = sized_model(name)
    prune = PruneConfig(sparsity=0.5)
    calib = resolve_calib(CalibConfig(height=1024, width=1024), None, prune.method)
    modules = dict(model.denoiser.named_modules())
    groups = group_units(model, prune, calib)
    profile = forward_profile(model, prune, calib)
    batches = math.ceil(calib.num_prompts / calib.batch_size)
    rows = []
    for w in world_sizes:
        per_group = [group_traffic(units, modules, w) for units in groups]
        plan = plan_memory(model, prune, calib, "cuda", None, weights, baseline_bytes=0, profile=profile,
                           world_size=w)
        cost = sum(g["cost"] for g in per_group)
        per_rank = math.ceil(batches / w)
        rows.append({
            "model": name, "world_size": w, "groups": len(groups), "prompt_batches": batches,
            "batches_per_rank_max": per_rank, "calibration_speedup": batches / per_rank,
            "hessian_bytes_per_group": [g["hessian_bytes"] for g in per_group],
            "hessian_bytes": sum(g["hessian_bytes"] for g in per_group),
            "broadcast_bytes": sum(g["broadcast_bytes"] for g in per_group),
            # groups solve one after another: each waits for its busiest owner
            "solve_balance_mean": sum(g["cost"] * g["balance"] for g in per_group) / cost,
            "solve_balance_worst": max(g["balance"] for g in per_group),
            "solve_speedup": cost / sum(g["busiest"] for g in per_group),
            "gpu_peak_gib": plan.peak["cuda"] / GiB, "host_peak_gib": plan.peak.get("cpu", 0) / GiB,
            "calib": {k: getattr(calib, k) for k in ("num_prompts", "steps", "batch_size", "groups", "height")}})
    return rows


def model_table(rows: list[dict]) -> str:
    return format_table(
        ["model", "ranks", "prompt batches per rank (max)", "calibration speed-up", "Hessian reduction GiB per group "
         "(max)", "Hessian reduction GiB total", "weight broadcast GiB", "solve balance (mean / worst group)",
         "solve speed-up", "GPU peak per rank GiB"],
        [[r["model"], r["world_size"], f"{r['batches_per_rank_max']} of {r['prompt_batches']}",
          r["calibration_speedup"], max(r["hessian_bytes_per_group"]) / GiB, r["hessian_bytes"] / GiB,
          r["broadcast_bytes"] / GiB, f"{r['solve_balance_mean']:.3f} / {r['solve_balance_worst']:.3f}",
          r["solve_speedup"], r["gpu_peak_gib"]] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny calibration, the fp64 case only, 20 images")
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs are written [a temporary directory]")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    num_images = 20 if args.quick else args.num_images
    cases = [c for c in CASES if c[0] == QUICK] if args.quick else CASES
    calib_args = QUICK_CALIB if args.quick else []
    with tempfile.TemporaryDirectory(prefix="obsdiff-dist-") as tmp:
        work = args.workdir or Path(tmp)
        measured = measure(work, cases, calib_args, num_images)
    calib, dense = measured[0]["calib"], measured[0]["metrics"]["reference_digit_accuracy"]
    weights = next(r["weights"] for r in measured if "weights" in r)
    text = [f"builtin:digits on this CPU ({os.cpu_count()} cores, load average {load:.1f} at the start), one "
            f"thread per process, {time.strftime('%Y-%m-%d')}; calibration {calib['num_prompts']} prompts x "
            f"{calib['steps']} steps, batch {calib['batch_size']}, {calib['groups']} groups; eval on {num_images} "
            f"images against the dense model (its digit accuracy: {dense:.3f}). `command s` is the whole command "
            "(with torchrun's start and the model load), `prune s` the report's total_seconds. The weight columns "
            "compare the saved weights (fp32) with the same setting's one-process run (`batch 8` rows: with the "
            "setting at batch 16 on one process): the largest relative difference of any tensor, and how many weights "
            f"are zero in one run only (of {weights} weights in the saved denoiser).\n\n" + measured_tables(measured)]
    model_rows = [row for name in MODELS for row in scaling_model(name)]
    c = model_rows[0]["calib"]
    text.append(f"Scaling model (no weights; obs-diff 50 %, bf16 on CUDA, {c['num_prompts']} prompts x {c['steps']} "
                f"steps, batch {c['batch_size']}, {c['height']} px, {c['groups']} groups). Calibration speed-up: "
                "batches over the busiest rank's batches. Bytes as the run report counts them: every non-owner's fp32 "
                "Hessian to its owner, every owner's bf16 weights to the W - 1 others. Solve balance: the busiest "
                "owner's cost over the mean, cost-weighted over the groups, and the worst group; solve speed-up: "
                "total cost over the sum of the groups' busiest owners. GPU peak: `plan_memory(world_size=W)` "
                "(Hessians and solve workspace do not shrink with W). No wall-time prediction: the only per-call "
                "seconds measured (bench/results/scale.json) are CPU ones at 256 px.\n\n" + model_table(model_rows))
    print("\n\n".join(text))
    save_results(args.out, "\n\n".join(text), {"measured": measured, "model": model_rows, "quick": args.quick,
                                                "num_images": num_images, "load_average": load}, t_start)


if __name__ == "__main__":
    main()
