"""`obsdiff-export onnx` at SD3-Medium width: export seconds, peak RSS, ONNX size and the checks that ran.

A random-weight pipeline with SD3-Medium's transformer config (hidden 1536, 24 heads of 64, T5 width 4096;
`--layers` blocks deep, 24 = the real 2.03 B parameters) is saved in fp16, 2:4-pruned on its first two
blocks by magnitude (`obsdiff prune --method magnitude`, no calibration), and the run is exported once per
precision and code version, each export in a fresh child process:

    flock /tmp/obsdiff-bigmem.lock .venv/bin/python bench/export_scale.py                 # 24 layers, fp16 + bf16
    flock /tmp/obsdiff-bigmem.lock .venv/bin/python bench/export_scale.py --before HEAD~1 # also the old exporter
    .venv/bin/python bench/export_scale.py --quick                                          # 2 layers, fp16

Peak RSS is the child's `ru_maxrss` (os.wait4), broken down by export phase by a sampler thread in the child
(VmRSS every 50 ms, attributed to the export function running). The exported weight size is the ONNX
`.data` file; the target is a peak of at most 2x that. `--before REV` runs `export/` as it was at git
revision REV (extracted to a temporary package) on the same run, for the before/after table; REV must import
the core as it is laid out now (obsdiff.runs, obsdiff.solver, ...: the subpackages' commit or a later one).
Parity runs at small shapes (16..64 latent pixels, 32..128 text tokens) so its torch and onnxruntime forwards
stay short on a CPU; the shapes do not change the weights, which set the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "export_scale.json"
PY = sys.executable

BUILD = """
import sys, torch
from obsdiff.testing import sized_pipeline
pipe = sized_pipeline("sd3-medium", num_layers=int(sys.argv[1]), dtype=torch.float16)
pipe.save_pretrained(sys.argv[2], safe_serialization=True)
"""

# What `obsdiff prune --method magnitude --sparsity-type 2:4 --blocks 0:2 --dtype fp16` does, through the API
PRUNE = """
import sys
from obsdiff.config import PruneConfig
from obsdiff.runs.io import save_run
from obsdiff.runs.loading import load_pipeline
from obsdiff.pruning.prune import prune_
model = load_pipeline(sys.argv[1], dtype="fp16")
report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4", blocks=(0, 2)), progress=False)
save_run(model, report.to_dict(), sys.argv[2])
"""

# Runs one export in this (child) process and writes its report, the phase-wise RSS peaks and VmHWM.
EXPORT = r"""
import json, sys, threading, time, importlib
pkg, run, out, dtype, result = sys.argv[1:6]
if pkg != "obsdiff.export":
    sys.path.insert(0, sys.argv[6])
E = importlib.import_module(pkg + ".onnx_export")
phase, peaks, done = ["between the phases below"], {}, []

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

def sample():
    while not done:
        p = phase[0]
        peaks[p] = max(peaks.get(p, 0), rss())
        time.sleep(0.05)

def watch(owner, name, label):
    f = getattr(owner, name, None)
    if f is None:
        return
    def wrapped(*a, **k):
        outer = phase[0]
        phase[0] = label
        try:
            return f(*a, **k)
        finally:
            peaks[label] = max(peaks.get(label, 0), rss())
            phase[0] = outer
    setattr(owner, name, wrapped)

C = E.C
for owner, name, label in [
        (E, "_load", "load"), (E, "_run_exporter", "torch.onnx.export + save"), (E, "_finalize", "graph passes"),
        (C, "check_model", "onnx checker"), (C, "torch_references", "torch reference outputs"),
        (C, "check_pruned_weights", "pruned-weight check"), (C, "check_parity", "parity (onnxruntime)"),
        (C, "nm_crosscheck", "N:M cross-check"), (C, "polygraphy_sparsity", "N:M cross-check")]:
    watch(owner, name, label)
threading.Thread(target=sample, daemon=True).start()
opset = 22 if dtype == "bf16" else 18
cfg = E.ExportConfig(dtype=dtype, opset=opset, height=(16, 32, 64), width=(16, 32, 64), text_len=(32, 64, 128))
t0 = time.perf_counter()
error = None
try:
    report = E.export_onnx(run, out, cfg)
except Exception as exc:
    report, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
seconds = time.perf_counter() - t0
done.append(1)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
json.dump({"report": report, "error": error, "seconds": seconds, "vmhwm": hwm, "phase_peaks": peaks},
          open(result, "w"), default=str)
"""


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def prepare(work: Path, layers: int) -> tuple[Path, dict]:
    """The fp16 base pipeline and its 2:4 magnitude run (both reused when present)."""
    base, run = work / "base", work / "run-24"
    info = {}
    if not (base / "model_index.json").exists():
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", BUILD, str(layers), str(base)], check=True)
        info["build_seconds"] = time.perf_counter() - t0
    if not (run / "obsdiff.json").exists():
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", PRUNE, str(base), str(run)], check=True)
        info["prune_seconds"] = time.perf_counter() - t0
    record = json.loads((run / "obsdiff.json").read_text())
    info["pruned_layers"] = sum(1 for r in record["layers"] if not r.get("skipped"))
    return run, info


def extract(rev: str, dest: Path) -> str:
    """`export/` at git revision `rev` as the package `export_<short rev>` under `dest`."""
    name = "export_" + subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", rev, "export"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "export").rename(dest / name)
    return name


def export_once(pkg: str, pkg_root: Path, run: Path, dtype: str, work: Path) -> dict:
    out = work / f"onnx-{pkg}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    result = work / f"result-{pkg}-{dtype}.json"
    t0 = time.perf_counter()
    child = subprocess.Popen([PY, "-c", EXPORT, pkg, str(run), str(out), dtype, str(result), str(pkg_root)],
                             env=os.environ | {"OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    data = json.loads(result.read_text()) if result.exists() else {"error": f"child exit status {status}"}
    files = sorted(out.glob("transformer.onnx*")) if out.exists() else []
    # the weights are the .data file; a graph under 2 GB may keep them inside the .onnx file
    weights = sum(f.stat().st_size for f in files if f.name.endswith(".data")) or sum(f.stat().st_size for f in files)
    comp = ((data.get("report") or {}).get("components") or {}).get("transformer")
    sidecar = json.loads((out / "transformer.json").read_text()) if (out / "transformer.json").exists() else {}
    checks = sidecar.get("checks", {})
    cross = checks.get("nm_crosscheck") or checks.get("polygraphy_sparsity") or {}
    parity = checks.get("parity", {})
    row = {
        "code": pkg, "dtype": dtype, "ok": comp is not None, "error": data.get("error"),
        "wall_seconds": round(wall, 1), "export_seconds": round(comp["export_seconds"], 1) if comp else None,
        "peak_rss_gib": _gib(usage.ru_maxrss * 1024), "onnx_gib": _gib(sum(f.stat().st_size for f in files)),
        "weights_gib": _gib(weights),
        "peak_over_weights": round(usage.ru_maxrss * 1024 / weights, 2) if weights else None,
        "checks": comp["checks"] if comp else None,
        "parity_mode": (parity.get("runs") or [{}])[0].get("mode"), "parity_max_rel": parity.get("max_rel"),
        "nm_crosscheck": {k: cross.get(k) for k in ("status", "tool", "weights", "tensors", "sparse_tensors",
                                                    "expected_at_least", "seconds", "reason") if k in cross},
        "phase_peak_rss_gib": {k: _gib(v) for k, v in (data.get("phase_peaks") or {}).items()},
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def _label(code: str) -> str:
    return f"before ({code[len('export_'):]})" if code.startswith("export_") else "after (this tree)"


def table(rows: list[dict]) -> str:
    head = ("| code | dtype | result | wall s | peak RSS GiB | weights GiB | peak / weights | parity "
            "| N:M cross-check |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cross = r["nm_crosscheck"]
        cc = (f"{cross.get('status')}: {cross.get('sparse_tensors')} of {cross.get('tensors')} tensors "
              f"({cross.get('weights')} weights, {cross.get('seconds', 0):.0f} s)" if cross.get("tool")
              else cross.get("reason") or cross.get("status") or "-")
        parity = (r["checks"] or {}).get("parity", "-")
        lines.append(f"| {_label(r['code'])} | {r['dtype']} | {'ok' if r['ok'] else r['error']} | "
                     f"{r['wall_seconds']} | {r['peak_rss_gib']} | {r['weights_gib']} | {r['peak_over_weights']} | "
                     f"{parity} | {cc} |")
    lines.append("")
    lines.append("Peak RSS (GiB) by phase:")
    lines.append("")
    phases = list(dict.fromkeys(p for r in rows for p in r["phase_peak_rss_gib"]))
    lines.append("| code | dtype | " + " | ".join(phases) + " |")
    lines.append("|---|---|" + "---|" * len(phases))
    for r in rows:
        lines.append(f"| {_label(r['code'])} | {r['dtype']} | " + " | ".join(str(r["phase_peak_rss_gib"].get(p, "-"))
                                                                    for p in phases) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (24: SD3-Medium's 2.03 B)")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--before", default=None, metavar="REV", help="also export with export/ at git revision REV")
    ap.add_argument("--before-only", action="store_true", help="with --before: only the old exporter")
    ap.add_argument("--work", type=Path, default=None, help="keep the pipeline and run here [temporary]")
    ap.add_argument("--quick", action="store_true", help="2 layers, fp16 only; results not written")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out (same layers) except those measured again")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.dtypes = 2, "fp16"
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="export_scale_") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        run, info = prepare(work, args.layers)
        versions = [("obsdiff.export", ROOT)]  # this tree
        if args.before:
            old = (extract(args.before, work), work)
            versions = [old] if args.before_only else [old, *versions]
        rows = []
        for dtype in args.dtypes.split(","):
            for pkg, root in versions:
                rows.append(export_once(pkg, root, run, dtype, work))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else {}
    if previous.get("layers") == args.layers:
        measured = {(r["code"], r["dtype"]) for r in rows}
        rows = [r for r in previous["rows"] if (r["code"], r["dtype"]) not in measured] + rows
        info = {k: v for k, v in previous.items() if k.endswith("_seconds") or k == "pruned_layers"} | info
    text = (f"# ONNX export at SD3-Medium width ({args.layers} blocks, 2:4 magnitude on blocks 0-1, run in fp16)\n\n"
            + table(rows))
    print(text)
    if not args.quick:
        save_results(args.out, text, {"layers": args.layers, **info, "rows": rows}, t_start)


if __name__ == "__main__":
    main()
