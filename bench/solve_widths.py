"""Seconds of one layer's OBS solve at the widths of real denoisers, next to its dense linear-algebra floor.

    python bench/solve_widths.py [--quick] [--max-width 12288] [--repeats 3] [--out bench/results/solve_widths.json]

For each layer shape (d_out x d_in, the layer of that input width in SD3-Medium, SD3.5-Large or Flux.1-dev),
one thread, random weights and a random SPD Hessian `H = 2 X^T X / N` (X: N > d_in rows):
- `floor`: the solve's dense linear algebra alone: Cholesky of the damped H, `cholesky_inverse`, the upper
  Cholesky of the inverse, and the lazy block products `Err @ U[b:e, e:]` subtracted from W (block 128);
- `obs_prune` for 50 % unstructured and 2:4, and their ratio to the floor (goal: <= 2 at every width);
- `obs_prune` for 2:4 with joint quantization, its ratio to 2:4 alone on the same W and H: with fixed scales
  (`quant=WeightQuantizer`, scales of the dense W made before and not timed), INT8 per output row (w8a8's
  weights; goal: <= 1.10 at 6144 inputs) and INT4 in groups of 128 inputs (w4a16's); and INT8 with the scale rule
  `prune --quant w8a8` uses (`quant=ScaleRule`: a pruning sweep first, then the clipping search on the weights
  it leaves, then the joint sweep);
- the per-layer error report (`obs.layer_errors`: both relative errors, float32) and, up to
  `--legacy-max-width`, the float64 `reconstruction_error` called twice as the report did before.
Medians over `--repeats` interleaved rounds (one round from d_in 9728 up). Up to 12288 by default (about
16 minutes on a 2-core CPU); `--max-width 15360` adds Flux's single-block proj_out (H 15360^2, ~5 GB peak,
more than 12 more minutes); `--quick` stops at 6144. Results are written after every width.
Peak memory stays under 3 GB up to 12288 (recorded per row); 15360 runs holding `/tmp/obsdiff-bigmem.lock`,
so it never overlaps another big job. `--min-width W --append` adds widths to an earlier run's results.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from common import save_results  # bench/ is the script's directory

from obsdiff.solver import obs
from obsdiff.solver.quant import FORMATS, ScaleRule, WeightQuantizer, weight_scales
from obsdiff.tables import format_table

# (layer, d_out, d_in)
SHAPES = [
    ("SD3-Medium attn.to_out.0", 1536, 1536),
    ("SD3.5-Large attn.to_out.0", 2432, 2432),
    ("Flux.1-dev attn.to_out.0", 3072, 3072),
    ("SD3-Medium ff.net.2", 1536, 6144),
    ("SD3.5-Large ff.net.2", 2432, 9728),
    ("Flux.1-dev ff.net.2", 3072, 12288),
    ("Flux.1-dev single proj_out", 3072, 15360),
]
BLOCK = 128
W4_GROUP = 128  # w4a16's group size
QUANT_GOAL = 1.10  # joint 2:4 + INT8 / 2:4 alone, at 6144 inputs


def problem(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in + 256, d_in, generator=g)
    H = X.T @ X
    H *= 2 / X.shape[0]
    del X
    return torch.randn(d_out, d_in, generator=g) * 0.02, H


def floor(W: torch.Tensor, H: torch.Tensor) -> None:
    """The dense linear algebra every blocked OBS solve must do, with nothing else around it."""
    U, _ = obs.damped_inverse_cholesky(H)
    W = W.clone()
    d_in = W.shape[1]
    Err = torch.zeros(W.shape[0], BLOCK)
    for b in range(0, d_in, BLOCK):
        e = min(b + BLOCK, d_in)
        if e < d_in:
            W[:, e:].addmm_(Err[:, :e - b], U[b:e, e:], alpha=-1)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, d_out: int, d_in: int, repeats: int, legacy: bool) -> dict:
    t_build = time.perf_counter()
    W, H = problem(d_out, d_in)
    t_build = time.perf_counter() - t_build
    W_new = obs.obs_prune(W, H, 0.5).weight
    int8, int4 = FORMATS["int8"], FORMATS["int4"]
    q8 = WeightQuantizer(weight_scales(W, int8), int8)
    q4 = WeightQuantizer(weight_scales(W, int4, W4_GROUP), int4, W4_GROUP)
    cases = {
        "floor": lambda: floor(W, H),
        "unstructured": lambda: obs.obs_prune(W, H, 0.5),
        "2:4": lambda: obs.obs_prune(W, H, nm=(2, 4)),
        "2:4+int8": lambda: obs.obs_prune(W, H, nm=(2, 4), quant=q8),
        "2:4+w4a16": lambda: obs.obs_prune(W, H, nm=(2, 4), quant=q4),
        "2:4+int8 rule": lambda: obs.obs_prune(W, H, nm=(2, 4), quant=ScaleRule(int8)),
        "errors": lambda: obs.layer_errors(W, W_new, H),
    }
    if legacy:
        cases["errors_fp64"] = lambda: (obs.reconstruction_error(W, W.masked_fill(W_new == 0, 0.0), H),
                                        obs.reconstruction_error(W, W_new, H))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):  # interleaved: load changes hit every case alike
        for k, fn in cases.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"layer": name, "d_out": d_out, "d_in": d_in, "repeats": repeats, "build_seconds": t_build,
           "seconds": med, "all_seconds": times,
           "ratio_unstructured": med["unstructured"] / med["floor"], "ratio_2_4": med["2:4"] / med["floor"],
           "quant_ratio_int8": med["2:4+int8"] / med["2:4"], "quant_ratio_w4a16": med["2:4+w4a16"] / med["2:4"],
           "quant_ratio_int8_rule": med["2:4+int8 rule"] / med["2:4"]}
    err0, err = obs.layer_errors(W, W_new, H)
    row["errors"] = {"mask_only": err0, "compensated": err}
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # the process so far
    if legacy:
        ref0 = obs.reconstruction_error(W, W.masked_fill(W_new == 0, 0.0), H)
        ref = obs.reconstruction_error(W, W_new, H)
        row["errors"] |= {"rel_diff_fp64": max(abs(err0 - ref0) / ref0, abs(err - ref) / ref)}
    return row


@contextlib.contextmanager
def bigmem_lock(path: str = "/tmp/obsdiff-bigmem.lock"):
    """The machine-wide lock that keeps jobs over 3 GB apart (as `flock PATH command` takes it)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def row_cells(r: dict) -> list:
    s = r["seconds"]
    return [r["layer"], f"{r['d_out']} x {r['d_in']}", s["floor"], s["unstructured"], r["ratio_unstructured"],
            s["2:4"], r["ratio_2_4"], s.get("2:4+int8"), r.get("quant_ratio_int8"), s.get("2:4+w4a16"),
            r.get("quant_ratio_w4a16"), s.get("2:4+int8 rule"), r.get("quant_ratio_int8_rule"), s["errors"],
            s.get("errors_fp64")]


def quant_goal(rows: list[dict]) -> dict | None:
    """The joint-quantization overhead goal at 6144 inputs (None when that width was not run)."""
    row = next((r for r in rows if r["d_in"] == 6144), None)
    if row is None:
        return None
    ratio = row.get("quant_ratio_int8")
    if ratio is None:  # a row appended from a run before these cases
        return None
    return {"d_in": 6144, "ratio_int8": ratio, "ratio_w4a16": row["quant_ratio_w4a16"],
            "ratio_int8_rule": row["quant_ratio_int8_rule"], "bound": QUANT_GOAL,
            "verdict": "PASS" if ratio <= QUANT_GOAL else "FAIL"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="input widths up to 6144, one round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds below d_in 9728 (median reported)")
    ap.add_argument("--max-width", type=int, default=12288, help="largest input width to run")
    ap.add_argument("--min-width", type=int, default=0, help="smallest input width to run")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing --out for other widths")
    ap.add_argument("--legacy-max-width", type=int, default=6144,
                    help="time the float64 error report up to this input width (it is slow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solve_widths.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    shapes = [s for s in SHAPES if args.min_width <= s[2] <= (6144 if args.quick else args.max_width)]
    rows = []
    if args.append and args.out.exists():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["d_in"] not in {s[2] for s in shapes}]
    headers = ["layer", "d_out x d_in", "floor s", "50 % s", "ratio", "2:4 s", "ratio", "2:4+int8 s", "vs 2:4",
               "2:4+w4a16 s", "vs 2:4", "2:4+int8 rule s", "vs 2:4", "errors s", "fp64 errors s"]
    table = [row_cells(r) for r in rows]
    for name, d_out, d_in in shapes:
        repeats = 1 if args.quick or d_in >= 9728 else args.repeats
        with bigmem_lock() if d_in > 12288 else contextlib.nullcontext():
            r = measure(name, d_out, d_in, repeats, legacy=d_in <= args.legacy_max_width)
        rows.append(r)
        table.append(row_cells(r))
        print(format_table(headers, table[-1:]).splitlines()[-1], flush=True)
        goal = quant_goal(rows)
        text = ("# OBS solve at real layer widths (one thread)\n\n" + format_table(headers, table) +
                "\n\nfloor: Cholesky of the damped H, cholesky_inverse, upper Cholesky of the inverse and the lazy"
                " block products alone. ratio: solve / floor. 2:4+int8 / 2:4+w4a16: 2:4 with joint quantization"
                f" and fixed scales (INT8 per row; INT4 in groups of {W4_GROUP}), vs 2:4: their time / 2:4 alone."
                " 2:4+int8 rule: the scales `prune --quant w8a8` uses (a pruning sweep, the clipping search on the"
                " weights it leaves, the joint sweep). errors: `obs.layer_errors` (both relative errors,"
                " float32); fp64 errors: `reconstruction_error` twice in float64 (the report before).")
        if goal is not None:
            text += (f"\n\nJoint quantization overhead at 6144 inputs, fixed scales: 2:4 + INT8 "
                     f"{goal['ratio_int8']:.3f}x, 2:4 + w4a16 {goal['ratio_w4a16']:.3f}x 2:4 alone (goal for INT8 <= "
                     f"{QUANT_GOAL}): **{goal['verdict']}**; with the prune's scale rule: 2:4 + INT8 "
                     f"{goal['ratio_int8_rule']:.3f}x.")
        # after every width: a long run cut short still leaves its finished rows
        save_results(args.out, text, {"threads": 1, "block_size": BLOCK, "rows": rows, "quant_goal": goal}, t_start)
    print("\n" + text)


if __name__ == "__main__":
    main()
