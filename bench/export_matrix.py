"""The deployment matrix at the released configurations: `obsdiff-export onnx` with its defaults, per model.

For SD3-Medium, SD3.5-Medium, SD3.5-Large, Flux.1-dev and SDXL (`obsdiff.testing.SIZED_MODELS`, random weights
at the published width, one block deep; Flux one double and one single block), dense and 2:4-pruned by magnitude
(`obsdiff prune --method magnitude --sparsity-type 2:4`, no calibration), the denoiser is exported with the
default ranges and opset, in the family's default precision and in the other half precision. Per row: export
seconds, parity max relative error against its tolerance (at the default profile's parity points), the N:M checks,
peak RSS (VmHWM of the child process that ran the export), ONNX MiB, and pass or fail with the one-line error.

    flock /tmp/obsdiff-bigmem.lock .venv/bin/python bench/export_matrix.py                  # every row
    .venv/bin/python bench/export_matrix.py --only sd3-medium --kinds dense --dtypes default --append
    .venv/bin/python bench/export_matrix.py --quick --out /tmp/m.json   # narrow widths, SD3-Medium, seconds

Every pipeline build, prune and export runs in its own child process, so each row's memory is its own. The
pipelines are saved in the family's default precision (how the releases are deployed); an export in the other
precision converts the weights as it loads them. `--append` merges the rows into an existing `--out` (rows
measured again replace the old ones), so the matrix can be measured a few rows at a time. Full width needs
memory: Flux.1-dev's one double and one single block hold 0.55 B parameters, its export several times that.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "export_matrix.json"
PY = sys.executable
MODELS = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "flux.1-dev", "sdxl")
KINDS = ("dense", "2of4")
OTHER_HALF = {"fp16": "bf16", "bf16": "fp16"}

BUILD = """
import sys, torch
from obsdiff.devices import torch_dtype
from obsdiff.testing import sized_pipeline
name, dtype, width, out = sys.argv[1:5]
single = 1 if name.startswith("flux") else None
pipe = sized_pipeline(name, num_layers=1, num_single_layers=single, dtype=torch_dtype(dtype), width=width)
pipe.save_pretrained(out, safe_serialization=True)
"""

# What `obsdiff prune --model BASE --method magnitude --sparsity-type 2:4 --dtype D` does, through the API
PRUNE = """
import sys
from obsdiff.config import PruneConfig
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_pipeline
from obsdiff.pruning.prune import prune_
base, dtype, out = sys.argv[1:4]
model = load_pipeline(base, dtype=dtype)
report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
save_run(model, report.to_dict(), out)
"""

# One export in this (child) process: its report, the records of the checks (kept even when a check fails and
# the export writes nothing), the seconds, VmHWM, and the RSS peak of each phase (VmRSS sampled every 50 ms).
EXPORT = r"""
import json, sys, threading, time
from obsdiff.devices import current_rss as rss
from obsdiff.export import onnx_export as E
source, out, dtype, result = sys.argv[1:5]
records, phase, peaks, done = {}, ["other"], {}, []

def sample():
    while not done:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss())
        time.sleep(0.05)

def watch(owner, name, label, keep=False):
    f = getattr(owner, name)
    def wrapped(*a, **k):
        outer, phase[0] = phase[0], label
        try:
            value = f(*a, **k)
        finally:
            peaks[label] = max(peaks.get(label, 0), rss())
            phase[0] = outer
        if keep:
            records[name] = value
        return value
    setattr(owner, name, wrapped)

for owner, name, label in [(E, "_load", "load"), (E.C, "torch_references", "torch reference"),
                           (E, "_run_exporter", "export"), (E.C, "check_parity", "parity"),
                           (E.C, "check_pruned_weights", "N:M"), (E.C, "nm_crosscheck", "N:M")]:
    watch(owner, name, label, keep=name in ("check_parity", "check_pruned_weights", "nm_crosscheck"))
threading.Thread(target=sample, daemon=True).start()
cfg = E.ExportConfig() if dtype == "default" else E.ExportConfig(dtype=dtype)
t0 = time.perf_counter()
report, error = None, None
try:
    report = E.export_onnx(source, out, cfg, progress=False)
except Exception as exc:
    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
seconds = time.perf_counter() - t0
done.append(1)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
for rec in records.values():
    rec.pop("runs", None)  # per-output details: the sidecar has them
json.dump({"report": report, "error": error, "seconds": seconds, "vmhwm": hwm, "records": records,
           "phase_peaks": peaks}, open(result, "w"), default=str)
"""


def default_dtype(name: str) -> str:
    """The precision `obsdiff-export onnx` picks for this release when given none."""
    from obsdiff.models import get_family
    from obsdiff.testing import SIZED_MODELS, sized_denoiser

    meta = sized_denoiser(name, num_layers=1, num_single_layers=1 if name.startswith("flux") else None,
                          device="meta")
    return get_family(SIZED_MODELS[name][1]).onnx_dtype(meta)[0]


def child(args: list[str], what: str) -> None:
    proc = subprocess.run([PY, "-c", *args], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed: {tail}")


def prepare(work: Path, name: str, width: str, dtype: str, pruned: bool) -> dict:
    """The base pipeline (saved in `dtype`) and, if `pruned`, its 2:4 magnitude run; reused when present."""
    base, run = work / name / "base", work / name / "run-2of4"
    info = {"base": base, "run": run}
    if not (base / "model_index.json").exists():
        t0 = time.perf_counter()
        child([BUILD, name, dtype, width, str(base)], f"building {name}")
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
    if pruned and not (run / "obsdiff.json").exists():
        t0 = time.perf_counter()
        child([PRUNE, str(base), dtype, str(run)], f"pruning {name}")
        info["prune_seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _status(rec: dict | None) -> str | None:
    return None if rec is None else rec.get("status")


def export_row(work: Path, name: str, width: str, kind: str, dtype: str, default: str, source: Path) -> dict:
    label = "default" if dtype == default else "other"
    out = work / name / f"onnx-{kind}-{dtype}"
    result = work / name / f"result-{kind}-{dtype}.json"
    for path in (result,):
        path.unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", EXPORT, str(source), str(out), "default" if label == "default" else dtype,
                           str(result)], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    wall = time.perf_counter() - t0
    if result.exists():
        data = json.loads(result.read_text())
    else:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        data = {"error": f"the export process died: {tail}"[:500], "records": {}}
    report = data.get("report") or {}
    (comp, summary), = (report.get("components") or {"-": None}).items()
    sidecar = json.loads((out / f"{comp}.json").read_text()) if summary else {}
    files = sorted(out.glob(f"{comp}.onnx*")) if summary else []
    records = data.get("records") or {}
    parity = records.get("check_parity") or {}
    pruned, cross = records.get("check_pruned_weights"), records.get("nm_crosscheck")
    row = {
        "model": name, "width": width, "kind": kind, "dtype": sidecar.get("dtype", dtype), "dtype_is": label,
        "opset": sidecar.get("opset"), "parameters": (sidecar.get("module") or {}).get("parameters"),
        "ok": data.get("error") is None and bool(summary), "error": data.get("error"),
        "wall_seconds": round(wall, 1),
        "export_seconds": round(summary["export_seconds"], 1) if summary else None,
        "check_seconds": round(sidecar["check_seconds"], 1) if sidecar else None,
        "parity": _status(parity or None), "parity_max_rel": parity.get("max_rel"),
        "parity_tolerance": parity.get("tolerance_rel"), "parity_points": parity.get("points"),
        "parity_reason": parity.get("reason"),
        "pruned_weights": _status(pruned), "pruned_weights_checked": (pruned or {}).get("checked"),
        "nm_crosscheck": _status(cross),
        "nm_sparse_tensors": (cross or {}).get("sparse_tensors"), "nm_tool": (cross or {}).get("tool"),
        "peak_rss_gib": round(data["vmhwm"] / 2**30, 2) if data.get("vmhwm") else None,
        "phase_peak_rss_gib": {k: round(v / 2**30, 2) for k, v in (data.get("phase_peaks") or {}).items()},
        "onnx_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1) if files else None,
    }
    subprocess.run(["rm", "-rf", str(out)], check=True)  # full-width graphs are GBs: one at a time on disk
    return row


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| model | width | kind | dtype | result | export s | parity max rel / tol | N:M | peak RSS GiB (in) "
             "| ONNX MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nm = "-" if r["kind"] == "dense" else (
            f"{r['pruned_weights']} ({r['pruned_weights_checked']} weights); cross-check {r['nm_crosscheck']} "
            f"({r['nm_sparse_tensors']} tensors)")
        parity = (f"{_num(r['parity_max_rel'], '.2g')} / {_num(r['parity_tolerance'], 'g')}"
                  if r["parity"] else "-")
        dtype = f"{r['dtype']} ({r['dtype_is']})"
        phases = r.get("phase_peak_rss_gib") or {}
        peak = f"{_num(r['peak_rss_gib'], '.2f')}" + (f" ({max(phases, key=phases.get)})" if phases else "")
        lines.append(f"| {r['model']} | {r['width']} | {r['kind']} | {dtype} | {'pass' if r['ok'] else 'FAIL'} | "
                     f"{_num(r['export_seconds'], '.1f')} | {parity} | {nm} | {peak} | "
                     f"{_num(r['onnx_mib'], '.1f')} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- {r['model']} {r['kind']} {r['dtype']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def _names(value: str | None, choices: tuple[str, ...], flag: str) -> list[str]:
    names = list(choices) if value in (None, "all") else [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad:
        raise SystemExit(f"error: {flag} {bad[0]!r}: use all or a comma list of {', '.join(choices)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma list of {', '.join(MODELS)} [all; --quick: sd3-medium]")
    ap.add_argument("--kinds", default="all", help="dense, 2of4 or both [all]")
    ap.add_argument("--dtypes", default="all", help="default (the family's), other (the other half precision) or "
                                                    "both [all]")
    ap.add_argument("--work", type=Path, default=None, help="keep the pipelines and runs here [temporary]")
    ap.add_argument("--quick", action="store_true", help="narrow widths (obsdiff.testing.NARROW_WIDTHS), SD3-Medium "
                                                         "unless --only says otherwise")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (.md beside it) [bench/results/"
                                                           "export_matrix.json; --quick: none unless given]")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out except those measured again")
    args = ap.parse_args()
    models = _names(args.only or ("sd3-medium" if args.quick else None), MODELS, "--only")
    kinds = _names(args.kinds, KINDS, "--kinds")
    which = _names(args.dtypes, ("default", "other"), "--dtypes")
    width = "narrow" if args.quick else "published"
    out = args.out or (None if args.quick else RESULTS)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="export_matrix_") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    rows, prepared = [], {}
    try:
        for name in models:
            default = default_dtype(name)
            dtypes = [default if w == "default" else OTHER_HALF[default] for w in which]
            try:
                info = prepare(work, name, width, default, "2of4" in kinds)
            except RuntimeError as exc:  # one failed model leaves a row per export it would have made
                rows += [{"model": name, "width": width, "kind": k, "dtype": d, "dtype_is": w, "ok": False,
                          "error": str(exc)} | dict.fromkeys(("export_seconds", "parity", "parity_max_rel",
                                                              "parity_tolerance", "pruned_weights", "nm_crosscheck",
                                                              "pruned_weights_checked", "nm_sparse_tensors",
                                                              "peak_rss_gib", "onnx_mib"))
                         for k in kinds for d, w in zip(dtypes, which, strict=True)]
                print(f"{name}: {exc}", flush=True)
                continue
            prepared[name] = {k: v for k, v in info.items() if k.endswith("_seconds")} | {"saved_dtype": default}
            for kind in kinds:
                for dtype in dtypes:
                    rows.append(export_row(work, name, width, kind, dtype, default,
                                           info["base"] if kind == "dense" else info["run"]))
                    r = rows[-1]
                    print(f"{name} {kind} {dtype}: {'pass' if r['ok'] else 'FAIL ' + str(r['error'])} "
                          f"({r['wall_seconds']} s, peak {r['peak_rss_gib']} GiB)", flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    if args.append and out is not None and out.exists():
        previous = json.loads(out.read_text())
        measured = {(r["model"], r["width"], r["kind"], r["dtype"]) for r in rows}
        rows = [r for r in previous.get("rows", [])
                if (r["model"], r["width"], r["kind"], r["dtype"]) not in measured] + rows
        prepared = previous.get("prepared", {}) | prepared
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (r["width"], order[r["model"]], KINDS.index(r["kind"]), r["dtype_is"] != "default"))
    text = (f"# ONNX export with the defaults at the released configurations ({width} width, one block; "
            "Flux one double and one single)\n\n" + table(rows))
    print(text)
    if out is not None:
        save_results(out, text, {"width": width, "prepared": prepared, "rows": rows}, t_start)
    if any(not r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
