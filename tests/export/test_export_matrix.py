"""Deployment matrix at the released configurations: SD3-Medium, SD3.5-Medium, SD3.5-Large, Flux.1-dev, SDXL.

Each denoiser has its published config at narrow width (`sized_pipeline(..., width="narrow")`: the published
graph with fewer and narrower heads), one block deep (Flux: one double and one single block), dense and
2:4-pruned by magnitude. Every export uses the defaults (no dtype, opset or ranges given), so the checks run on
what a user gets: parity at the default profile's points and the N:M checks. The pruned runs are then written
as plain diffusers folders and generate in a process that cannot import obsdiff.

Small test models missed shape bugs these configs hit (SD3-Medium's 192-patch position table at 65 patches a
side); the matrix keeps every release's graph-shaping fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from obsdiff.testing import SIZED_MODELS, sized_pipeline

pytestmark = pytest.mark.slow

# name -> (depth, Flux single blocks, the precision the weights are stored in: what each release is deployed in)
MODELS = {
    "sd3-medium": (1, None, torch.float16),
    "sd3.5-medium": (1, None, torch.bfloat16),
    "sd3.5-large": (1, None, torch.bfloat16),
    "flux.1-dev": (1, 1, torch.bfloat16),
    "sdxl": (1, None, torch.float16),
}
FAMILY = {name: family for name, (_, family, _) in SIZED_MODELS.items()}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Every release's default image is 1024 px: 128 latent pixels (the pipelines' default_sample_size).
DEFAULT_LATENT = 128
CASES = [pytest.param(name, kind, id=f"{name}-{kind}") for name in MODELS for kind in ("dense", "2of4")]
TIMES: dict[str, float] = {}  # seconds per stage, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_times():
    t0 = time.perf_counter()
    yield
    total = time.perf_counter() - t0
    print(f"\nexport matrix: {total:.0f} s; " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()))


def _timed(key: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        TIMES[key] = time.perf_counter() - t0


class Lazy:
    """Builds each value once, on first use, and remembers a failure so that only the cases needing it fail."""

    def __init__(self, make):
        self.make, self.values = make, {}

    def __call__(self, *key):
        if key not in self.values:
            try:
                self.values[key] = (True, self.make(*key))
            except Exception as exc:  # re-raised in every case that needs it
                self.values[key] = (False, exc)
        ok, value = self.values[key]
        if not ok:
            raise value
        return value


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def pipelines(work):
    def make(name):
        layers, single, dtype = MODELS[name]
        path = work / name / "base"
        pipe = sized_pipeline(name, num_layers=layers, num_single_layers=single, dtype=dtype, width="narrow")
        pipe.save_pretrained(path, safe_serialization=True)
        return path

    return Lazy(lambda name: _timed(f"{name} build", make, name))


@pytest.fixture(scope="module")
def runs(work, pipelines):
    """The 2:4 run of each model: `obsdiff prune --method magnitude --sparsity-type 2:4` (no calibration)."""
    from obsdiff.config import PruneConfig
    from obsdiff.pruning.prune import prune_
    from obsdiff.runs.io import save_run
    from obsdiff.runs.loading import load_pipeline

    def make(name):
        model = load_pipeline(str(pipelines(name)), dtype=DTYPE_NAMES[MODELS[name][2]])
        report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
        return save_run(model, report.to_dict(), work / name / "run-2of4")

    return Lazy(lambda name: _timed(f"{name} prune", make, name))


def _pruned_layers(run) -> list[str]:
    return [x["name"] for x in json.loads((run / "obsdiff.json").read_text())["layers"] if not x.get("skipped")]


@pytest.fixture(scope="module")
def exports(work, pipelines, runs):
    """(sidecar of the denoiser graph, export report) per (model, dense or 2of4), exported with the defaults."""
    from obsdiff.export import onnx_export

    def make(name, kind):
        source = pipelines(name) if kind == "dense" else runs(name)
        out = work / name / f"onnx-{kind}"
        report = onnx_export.export_onnx(str(source), out, onnx_export.ExportConfig(), progress=False)
        (component,) = report["components"]
        return json.loads((out / f"{component}.json").read_text()), report

    return Lazy(lambda name, kind: _timed(f"{name} {kind} export", make, name, kind))


@pytest.mark.parametrize("name,kind", CASES)
def test_default_export_passes_every_check(exports, runs, name, kind):
    sidecar, report = exports(name, kind)
    checks = sidecar["checks"]
    assert {k: v["status"] for k, v in checks.items()} == report["components"][sidecar["component"]]["checks"]
    assert checks["onnx_checker"]["status"] == checks["no_float64"]["status"] == "passed"
    parity = checks["parity"]
    assert parity["status"] == "passed", parity.get("reason")
    assert parity["max_rel"] <= parity["tolerance_rel"]
    # no dtype given: the release's deployment precision, half precision for every one of these
    assert sidecar["dtype"] in ("fp16", "bf16") and sidecar["requested_dtype"] in ("auto", sidecar["dtype"])
    assert sidecar["opset"] >= (22 if sidecar["dtype"] == "bf16" else 18)
    if kind == "dense":
        assert checks["pruned_weights"]["status"] == "skipped" and "nm_crosscheck" not in checks
        return
    pruned = _pruned_layers(runs(name))
    found = checks["pruned_weights"]
    assert found["status"] == "passed" and found["pattern"] == "2:4", found.get("reason")
    assert found["checked"] == len(pruned) > 0 and found["violating"] == found["mismatched"] == 0
    assert found["zero_fraction"] == pytest.approx(0.5, abs=0.01)
    cross = checks["nm_crosscheck"]
    assert cross["status"] == "passed", cross.get("reason")
    assert cross["sparse_tensors"] >= cross["expected_at_least"] == len(pruned)


@pytest.mark.parametrize("name,kind", CASES)
def test_default_parity_points_cover_odd_patches_and_the_default_resolution(exports, name, kind):
    sidecar, _ = exports(name, kind)
    points, dims = sidecar["checks"]["parity"]["points"], sidecar["dims"]
    multiple = dims["height"]["multiple"]  # patch size (SD3), packed 2x2 (Flux), down-sampling factor (SDXL)
    assert multiple == {"sd3": 2, "flux": 2, "sdxl": 4}[FAMILY[name]]
    # shape arithmetic that only holds for even counts (SD3-Medium's position-table crop) fails at odd ones
    assert any((p["height"] // multiple) % 2 and (p["width"] // multiple) % 2 for p in points), points
    # the release's 1024 px default, the shape the graph is traced at and the engine tuned for
    assert any(p["height"] == p["width"] == DEFAULT_LATENT for p in points), points
    for p in points:  # inside the exported profile
        assert all(dims[k]["min"] <= p[k] <= dims[k]["max"] for k in ("batch", "height", "width", "text")), p


# Runs where `import obsdiff` fails: stock diffusers loads each folder with no arguments and generates one
# small image. Arguments: FOLDER NAME pairs; prints one JSON line per folder (errors included).
PLAIN_DIFFUSERS = """
import json, sys, traceback
sys.modules["obsdiff"] = None
try:
    import obsdiff  # noqa: F401
    raise SystemExit("obsdiff is importable")
except ImportError:
    pass
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
args = sys.argv[1:]
for folder, name in zip(args[::2], args[1::2]):
    try:
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        extra = {} if name == "sdxl" else {"max_sequence_length": 8}
        image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0), **extra).images
        den = getattr(pipe, "transformer", None) or pipe.unet
        weights = [m.weight for m in den.modules() if isinstance(m, torch.nn.Linear) and m.in_features % 4 == 0]
        nm = sum(int(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()) for w in weights)
        result = {"pipeline": type(pipe).__name__, "denoiser": type(den).__name__, "shape": list(image.shape),
                  "finite": bool(torch.isfinite(image).all()), "linears_2of4": nm}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "traceback": traceback.format_exc()}
    print(json.dumps({"name": name} | result), flush=True)
assert not any(n == "obsdiff" or n.startswith("obsdiff.") for n in sys.modules if sys.modules[n])
"""


@pytest.fixture(scope="module")
def plain_generations(work, runs):
    """`obsdiff-export diffusers` of every 2:4 run, then one plain-diffusers process generating from each."""
    from obsdiff.export.diffusers_export import export_diffusers

    folders, failed = {}, {}
    t0 = time.perf_counter()
    for name in MODELS:
        try:
            folders[name] = work / name / "diffusers"
            export_diffusers(runs(name), folders[name])
        except Exception as exc:
            failed[name] = exc
            folders.pop(name)
    TIMES["diffusers export"] = time.perf_counter() - t0
    args = [str(x) for name, folder in folders.items() for x in (folder, name)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, *args], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    TIMES["plain diffusers generation"] = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    return results, failed


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_run_generates_with_plain_diffusers(plain_generations, runs, name):
    results, failed = plain_generations
    if name in failed:
        raise failed[name]
    r = results[name]
    assert "error" not in r, r.get("traceback")
    family = FAMILY[name]
    pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sdxl": "StableDiffusionXLPipeline"}
    assert r["pipeline"] == pipeline[family]
    assert r["shape"] == [1, 3, 64, 64] and r["finite"]
    pruned = _pruned_layers(runs(name))
    assert r["linears_2of4"] == len(pruned) > 0  # the pruned weights, and no random dense one, hold 2:4
