"""Faults from the operating system and from files, over every command of `obsdiff` and `obsdiff-export`.

Each fault ends the command with one `error:` line on stderr that names the path (exit 2; Ctrl-C 130), no
traceback, and nothing left behind: the working directory holds exactly what it held before. The one exception
is a prune's OUT.partial once it exists: it keeps finished groups for --resume by design, and the next run
names it. Faults that the commands can see before working (paths, inputs) leave stderr with nothing but that
line; faults in the middle of the work (a full disk, Ctrl-C) are simulated by patching the writer or a long
step, in process, so the table stays fast.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from obsdiff.cli import cli as obsdiff_cli
from obsdiff.errors import BadFileError, OutputPathError, first_line, os_error_message
from obsdiff.runs.artifacts import check_json, read_json, staged_dir, staged_file
from tests.engines.conftest import SD3_INPUTS, export_sidecar, tiny_run_24  # noqa: F401 (a fixture used below)

ROOT = Path(__file__).resolve().parents[1]


def export_entry_point() -> tuple[str, str]:
    """(module, function) of the `obsdiff-export` script as pyproject.toml declares it."""
    text = (ROOT / "pyproject.toml").read_text()
    module, func = re.search(r'^obsdiff-export\s*=\s*"([\w.]+):(\w+)"', text, re.M).groups()
    return module, func


def export_cli():
    return importlib.import_module(export_entry_point()[0]).cli


def sd3_class():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


# ------------------------------------------------------------------------------------------ the inputs


def write_export(folder: Path, sidecar_text: str | bytes | None = None) -> Path:
    """A stand-in export directory: transformer.onnx (bytes) with its sidecar (or `sidecar_text` instead)."""
    folder.mkdir()
    onnx = folder / "transformer.onnx"
    onnx.write_bytes(b"onnx graph bytes")
    record = export_sidecar(SD3_INPUTS, sha256=hashlib.sha256(onnx.read_bytes()).hexdigest())
    record["dims"] = {"batch": {"min": 1, "opt": 2, "max": 8}}
    text = json.dumps(record) if sidecar_text is None else sidecar_text
    (folder / "transformer.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


NOT_UTF8 = b"\xff\xfe\x00 a cat \xc3\x28\n"
TRUNCATED = '{"format": 2, "base_model": "builtin:di'


@pytest.fixture
def p(tmp_path, tiny_sd3_dir, request):
    """The paths the faults use, created fresh for each case under `root`."""
    run = request.getfixturevalue("tiny_run_24")  # the engines' fixture, imported above
    root = tmp_path / "w"
    root.mkdir()
    (root / "afile").write_text("a regular file where a directory should be\n")
    (root / "bad.txt").write_bytes(NOT_UTF8)
    (root / "prompts-dir").mkdir()
    runs = {}
    wrong_types = {"format": "2", "base_model": 7, "denoiser_file": 3}
    for name, content in [("run-garbage", bytes(range(256)) * 4), ("run-truncated", TRUNCATED.encode()),
                          ("run-wrong-shape", b'["base_model", "denoiser_file"]'),
                          ("run-wrong-types", json.dumps(wrong_types).encode())]:
        (root / name).mkdir()
        (root / name / "obsdiff.json").write_bytes(content)
        runs[name] = root / name
    for name, content in [("pipe-garbage", NOT_UTF8), ("pipe-array", b"[1]")]:  # model_index.json only
        (root / name).mkdir()
        (root / name / "model_index.json").write_bytes(content)
    (root / "good.onnx").write_bytes(b"onnx graph bytes")
    (root / "good.json").write_text(json.dumps(export_sidecar(SD3_INPUTS)))
    (root / "dir.onnx").mkdir()
    (root / "dir.json").write_text(json.dumps(export_sidecar(SD3_INPUTS)))
    for name, content in [("trunc", TRUNCATED.encode()), ("latin", NOT_UTF8), ("shape", b'{"inputs": "x"}'),
                          ("list", b"[1, 2, 3]")]:
        (root / f"{name}.onnx").write_bytes(b"onnx graph bytes")
        (root / f"{name}.json").write_bytes(content)
    good = write_export(root / "export")
    write_export(root / "export-truncated", TRUNCATED)
    write_export(root / "export-no-file", json.dumps({"artifact": "onnx", "component": "transformer"}))
    engine = write_export(root / "export-engine")
    (engine / "transformer.plan").write_bytes(b"engine bytes")
    (engine / "transformer.plan.json").write_text(TRUNCATED)
    return SimpleNamespace(root=root, tiny=str(tiny_sd3_dir), run=str(run), afile=root / "afile",
                           bad=root / "bad.txt", prompts_dir=root / "prompts-dir", export=good, **{
                               k.replace("-", "_"): v for k, v in runs.items()})


def snapshot(root: Path) -> set[str]:
    return {str(q.relative_to(root)) for q in root.rglob("*")}


# ------------------------------------------------------------------------------------------ the faults


def enospc(*args) -> OSError:
    """What a write to a full disk raises: no file name (the file was opened before the disk filled up)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_at(name: str):
    """Patch the file writers so that writing `name` (or its staged temporary) fills the disk half-way."""

    def hits(path: Path) -> bool:
        return path.name == name or path.name.startswith(f".{name}.")

    def patch(mp, p):
        real_text, real_bytes = Path.write_text, Path.write_bytes

        def write_text(self, data, *args, **kwargs):
            if hits(self):
                real_text(self, data[: len(data) // 2], *args, **kwargs)
                raise enospc()
            return real_text(self, data, *args, **kwargs)

        def write_bytes(self, data):
            if hits(self):
                real_bytes(self, data[: len(data) // 2])
                raise enospc()
            return real_bytes(self, data)

        mp.setattr(Path, "write_text", write_text)
        mp.setattr(Path, "write_bytes", write_bytes)

    return patch


def disk_full_in_png(mp, p):
    from PIL import Image

    def save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise enospc()

    mp.setattr(Image.Image, "save", save)


def raising(exc_type, target):
    """Patch `target` ("module:attr", or a callable giving (object, attr)) to raise `exc_type` when called."""

    def patch(mp, p):
        def boom(*args, **kwargs):
            raise exc_type("the user pressed Ctrl-C" if exc_type is KeyboardInterrupt else "a bug")

        if callable(target):
            mp.setattr(*target(), boom)
        else:
            module, attr = target.split(":")
            mp.setattr(importlib.import_module(module), attr, boom)

    return patch


CTRL_C_IN_FORWARD = raising(KeyboardInterrupt, lambda: (sd3_class(), "forward"))
# What torch's CPU allocator raises for a tensor larger than the machine's memory (a plain RuntimeError)
CPU_ALLOCATION_FAILED = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")


def allocation_fails_in(target):
    """Patch `target` (a callable giving (object, attr)) to fail to allocate, as a too-large image or batch makes
    it do: the pipeline call (inside the commands' loops and their progress bars) or the denoiser's forward."""

    def patch(mp, p):
        def boom(*args, **kwargs):
            raise RuntimeError(CPU_ALLOCATION_FAILED)

        mp.setattr(*target(), boom)

    return patch


def sd3_pipeline_class():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline


OUT_OF_MEMORY_IN_PIPELINE = allocation_fails_in(lambda: (sd3_pipeline_class(), "__call__"))


OUT_OF_MEMORY = ("out of memory (tried to allocate 37.25 GiB on the CPU)",)


@dataclass
class Fault:
    id: str
    tool: str  # "obsdiff" or "export"
    args: callable  # p -> command line
    names: callable | None  # p -> the path the error line must name (None: Ctrl-C before any output was staged)
    code: int = 2
    words: tuple = ()  # more fragments the error line must hold
    patch: callable | None = None
    upfront: bool = True  # found before any work: stderr holds nothing but the error line
    may_leave: tuple = ()  # names in p.root that may exist afterwards (a prune's resumable OUT.partial)
    subprocess: bool = False  # run the real entry point in a fresh interpreter
    needs: str | None = None  # a fixture the case needs (e.g. a mounted file system)


GEN = ["generate", "--prompt", "a red cat", "--steps", "1", "--device", "cpu", "--dtype", "fp32"]
EVAL = ["--num-images", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--dtype", "fp32"]
PRUNE = ["prune", "--method", "magnitude", "--sparsity-type", "2:4", "--device", "cpu", "--dtype", "fp32"]
BENCH = ["bench", "--backend", "torch", "--warmup", "0", "--iters", "1", "--device", "cpu"]
ONNX = ["onnx", "--exporter", "legacy", "--device", "cpu"]
INTERRUPTED = ("interrupted (Ctrl-C)", "run the command again")

FAULTS = [
    # obsdiff generate
    Fault("generate-out-under-file", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.afile / "x.png"],
          lambda p: p.afile / "x.png", words=("is a file, not a directory",)),
    Fault("generate-out-in-proc", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", "/proc/obsdiff/x.png"],
          lambda p: "/proc/obsdiff/x.png", words=("/proc does not accept new files",)),
    Fault("generate-out-in-sys", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", "/sys/obsdiff-x.png"],
          lambda p: "/sys/obsdiff-x.png", words=("/sys does not accept new files",)),
    Fault("generate-out-no-permission", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.locked / "x.png"],
          lambda p: p.locked / "x.png", words=("does not accept new files",), needs="locked_dir"),
    Fault("generate-run-record-garbage", "obsdiff", lambda p: [*GEN, "--model", p.run_garbage,
                                                               "--out", p.root / "x.png"],
          lambda p: p.run_garbage / "obsdiff.json", words=("not UTF-8 text",)),
    Fault("generate-out-read-only-fs", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.ro / "x.png"],
          lambda p: p.ro / "x.png", words=("Read-only file system",), needs="read_only_fs"),
    Fault("generate-disk-full", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.root / "new" / "x.png"],
          lambda p: p.root / "new" / "x.png", words=("ENOSPC", "nothing was written"), patch=disk_full_in_png,
          upfront=False),
    Fault("generate-ctrl-c", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.root / "x.png"],
          None, code=130, words=INTERRUPTED, patch=CTRL_C_IN_FORWARD, upfront=False),
    Fault("generate-out-of-memory", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--out", p.root / "x.png"],
          None, words=(*OUT_OF_MEMORY, "lower --height/--width"), patch=OUT_OF_MEMORY_IN_PIPELINE, upfront=False),
    Fault("generate-size-not-a-multiple", "obsdiff", lambda p: [*GEN, "--model", p.tiny, "--height", "17",
                                                                "--out", p.root / "x.png"],
          None, words=("--height 17 is not a multiple of 4", "VAE factor 2 x patch size 2", "use 16 or 20")),
    # obsdiff eval
    Fault("eval-prompts-not-utf8", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--prompts", p.bad,
                                                         "--out", p.root / "e"],
          lambda p: p.bad, words=("not UTF-8 text",)),
    Fault("eval-prompts-is-dir", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--prompts", p.prompts_dir,
                                                       "--out", p.root / "e"],
          lambda p: p.prompts_dir, words=("is a directory", "--help")),
    Fault("eval-run-record-garbage", "obsdiff", lambda p: ["eval", p.run_garbage, *EVAL, "--out", p.root / "e"],
          lambda p: p.run_garbage / "obsdiff.json", words=("not UTF-8 text", "re-run obsdiff prune"), upfront=False),
    Fault("eval-run-record-truncated", "obsdiff", lambda p: ["eval", p.run_truncated, *EVAL],
          lambda p: p.run_truncated / "obsdiff.json", words=("truncated JSON",), upfront=False),
    Fault("eval-out-under-file", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--out", p.afile / "e"],
          lambda p: p.afile / "e", words=("is a file",)),
    Fault("eval-disk-full", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--out", p.root / "e"],
          lambda p: p.root / "e", words=("ENOSPC", "nothing was written"), patch=disk_full_at("metrics.json"),
          upfront=False),
    Fault("eval-ctrl-c", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--out", p.root / "e"],
          None, code=130, words=INTERRUPTED, patch=CTRL_C_IN_FORWARD, upfront=False),
    Fault("eval-out-of-memory", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--out", p.root / "e"],
          None, words=(*OUT_OF_MEMORY, "--batch-size"), patch=OUT_OF_MEMORY_IN_PIPELINE, upfront=False),
    Fault("eval-size-beyond-the-position-table", "obsdiff", lambda p: ["eval", p.tiny, *EVAL, "--width", "100000",
                                                                       "--out", p.root / "e"],
          None, words=("--width 100000 is larger than 64", "position table", "use 64 or less")),
    # obsdiff prune
    Fault("prune-out-under-file", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.afile / "r"],
          lambda p: p.afile / "r", words=("is a file",)),
    Fault("prune-out-in-proc", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", "/proc/obsdiff-run"],
          lambda p: "/proc/obsdiff-run", subprocess=True),
    Fault("prune-out-no-permission", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.locked / "r"],
          lambda p: p.locked / "r", words=("does not accept new files",), needs="locked_dir"),
    Fault("prune-out-read-only-fs", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.ro / "r"],
          lambda p: p.ro / "r", words=("EROFS",), needs="read_only_fs"),
    Fault("prune-prompts-not-utf8", "obsdiff", lambda p: [*PRUNE, "--method", "sparsegpt", "--model", p.tiny,
                                                          "--prompts", p.bad, "--out", p.root / "r"],
          lambda p: p.bad, words=("not UTF-8 text", "one prompt per line")),
    Fault("prune-model-run-garbage", "obsdiff", lambda p: [*PRUNE, "--model", p.run_garbage, "--out", p.root / "r"],
          lambda p: p.run_garbage / "obsdiff.json", words=("unreadable",)),
    Fault("prune-model-run-wrong-types", "obsdiff", lambda p: [*PRUNE, "--model", p.run_wrong_types,
                                                               "--out", p.root / "r"],
          lambda p: p.run_wrong_types / "obsdiff.json", words=("'base_model' is an integer, not a string",
                                                                "not written by obsdiff prune")),
    Fault("prune-model-index-not-utf8", "obsdiff", lambda p: [*PRUNE, "--model", p.root / "pipe-garbage",
                                                              "--out", p.root / "r"],
          lambda p: p.root / "pipe-garbage" / "model_index.json", words=("not UTF-8 text",)),
    Fault("prune-disk-full", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.root / "r"],
          lambda p: p.root / "r", words=("ENOSPC", "nothing was written"), patch=disk_full_at("obsdiff.json"),
          upfront=False, may_leave=("r.partial",)),
    Fault("prune-disk-full-for-real", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.full / "r"],
          lambda p: p.full / "r", words=("No space left on device",), upfront=False, needs="full_fs",
          may_leave=("r.partial",)),
    Fault("prune-ctrl-c", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.root / "r"],
          lambda p: p.root / "r.partial", code=130, words=("--resume",), upfront=False,
          patch=raising(KeyboardInterrupt, "obsdiff.pruning.prune:prune_"), may_leave=("r.partial",)),
    Fault("prune-out-of-memory-while-calibrating", "obsdiff", lambda p: [*PRUNE, "--method", "sparsegpt", "--model",
                                                                         p.tiny, "--out", p.root / "r"],
          None, words=(*OUT_OF_MEMORY, "--max-memory"), patch=OUT_OF_MEMORY_IN_PIPELINE, upfront=False,
          may_leave=("r.partial",)),
    Fault("prune-size-not-a-multiple", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--height", "17",
                                                             "--width", "17", "--out", p.root / "r"],
          None, words=("--height 17 is not a multiple of 4", "use 16 or 20")),
    Fault("prune-ctrl-c-while-loading", "obsdiff", lambda p: [*PRUNE, "--model", p.tiny, "--out", p.root / "r"],
          None, code=130, words=INTERRUPTED, upfront=False,
          patch=raising(KeyboardInterrupt, "obsdiff.runs.loading:load_pipeline")),
    # obsdiff info, report
    Fault("info-ctrl-c", "obsdiff", lambda p: ["info"], None, code=130, words=INTERRUPTED,
          patch=raising(KeyboardInterrupt, "obsdiff.info:environment_info")),
    Fault("report-run-record-truncated", "obsdiff", lambda p: ["report", p.run_truncated],
          lambda p: p.run_truncated / "obsdiff.json", words=("truncated JSON",)),
    Fault("report-out-in-proc", "obsdiff", lambda p: ["report", p.run, "--out", "/proc/obsdiff-plots"],
          lambda p: "/proc/obsdiff-plots"),
    Fault("report-ctrl-c", "obsdiff", lambda p: ["report", p.run, "--out", p.root / "plots"],
          lambda p: p.root / "plots" / "layer_errors.png", code=130, words=("the unfinished", "was removed"),
          patch=raising(KeyboardInterrupt, "obsdiff.eval.plots:plot_layer_errors"), upfront=False),
    # obsdiff-export onnx
    Fault("onnx-out-under-file", "export", lambda p: [*ONNX, p.tiny, "--out", p.afile / "onnx"],
          lambda p: p.afile / "onnx", words=("is a file",)),
    Fault("onnx-out-in-sys", "export", lambda p: [*ONNX, p.tiny, "--out", "/sys/obsdiff-onnx"],
          lambda p: "/sys/obsdiff-onnx"),
    Fault("onnx-run-record-wrong-shape", "export", lambda p: [*ONNX, p.run_wrong_shape, "--out", p.root / "o"],
          lambda p: p.run_wrong_shape / "obsdiff.json", words=("holds an array, not an object",)),
    Fault("onnx-model-index-an-array", "export", lambda p: [*ONNX, p.root / "pipe-array", "--out", p.root / "o"],
          lambda p: p.root / "pipe-array" / "model_index.json", words=("holds an array",)),
    Fault("onnx-disk-full", "export", lambda p: [*ONNX, p.tiny, "--out", p.root / "o"],
          lambda p: p.root / "o", words=("ENOSPC",), upfront=False,
          patch=raising(enospc,
                        "obsdiff.export.onnx_export:_run_exporter")),
    Fault("onnx-disk-full-for-real", "export", lambda p: [*ONNX, p.tiny, "--out", p.full / "o"],
          lambda p: p.full / "o", words=("No space left on device",), upfront=False, needs="full_fs"),
    Fault("onnx-ctrl-c", "export", lambda p: [*ONNX, p.tiny, "--out", p.root / "o"],
          lambda p: p.root / "o", code=130, words=("the unfinished", "was removed"), upfront=False,
          patch=raising(KeyboardInterrupt, "obsdiff.export.onnx_export:_run_exporter")),
    # obsdiff-export diffusers
    Fault("diffusers-run-record-garbage", "export", lambda p: ["diffusers", p.run_garbage, "--out", p.root / "d"],
          lambda p: p.run_garbage / "obsdiff.json", words=("not UTF-8 text",)),
    Fault("diffusers-out-under-file", "export", lambda p: ["diffusers", p.run, "--out", p.afile / "d"],
          lambda p: p.afile / "d", words=("is a file",)),
    Fault("diffusers-out-in-proc", "export", lambda p: ["diffusers", p.run, "--out", "/proc/obsdiff-pipeline"],
          lambda p: "/proc/obsdiff-pipeline"),
    Fault("diffusers-disk-full", "export", lambda p: ["diffusers", p.run, "--out", p.root / "d"],
          lambda p: p.root / "d", words=("ENOSPC", "nothing was written"), upfront=False,
          patch=raising(enospc,
                        "obsdiff.export.diffusers_export:_place_tree")),
    Fault("diffusers-ctrl-c", "export", lambda p: ["diffusers", p.run, "--out", p.root / "d"],
          lambda p: p.root / "d", code=130, words=("the unfinished", "was removed"), upfront=False,
          patch=raising(KeyboardInterrupt, "obsdiff.export.diffusers_export:_place_tree")),
    # obsdiff-export build-engine (TensorRT is not needed: every input is checked first)
    Fault("build-engine-onnx-is-dir", "export", lambda p: ["build-engine", p.root / "dir.onnx",
                                                           "--out", p.root / "e.plan"],
          lambda p: p.root / "dir.onnx", words=("is a directory", "--help"), subprocess=True),
    Fault("build-engine-out-in-proc", "export", lambda p: ["build-engine", p.root / "good.onnx",
                                                           "--out", "/proc/obsdiff.plan"],
          lambda p: "/proc/obsdiff.plan", words=("does not accept new files",)),
    Fault("build-engine-out-under-file", "export", lambda p: ["build-engine", p.root / "good.onnx",
                                                              "--out", p.afile / "e.plan"],
          lambda p: p.afile / "e.plan", words=("is a file",)),
    Fault("build-engine-sidecar-truncated", "export", lambda p: ["build-engine", p.root / "trunc.onnx",
                                                                 "--out", p.root / "e.plan"],
          lambda p: p.root / "trunc.json", words=("truncated JSON", "re-export")),
    Fault("build-engine-sidecar-not-utf8", "export", lambda p: ["build-engine", p.root / "latin.onnx",
                                                                "--out", p.root / "e.plan"],
          lambda p: p.root / "latin.json", words=("not UTF-8 text",)),
    Fault("build-engine-sidecar-wrong-shape", "export", lambda p: ["build-engine", p.root / "shape.onnx",
                                                                   "--out", p.root / "e.plan"],
          lambda p: p.root / "shape.json"),
    Fault("build-engine-sidecar-a-list", "export", lambda p: ["build-engine", p.root / "list.onnx",
                                                              "--out", p.root / "e.plan"],
          lambda p: p.root / "list.json", words=("holds an array",)),
    # obsdiff-export bench
    Fault("bench-size-not-a-multiple", "export", lambda p: [*BENCH, p.tiny, "--width", "18",
                                                           "--json", p.root / "b.json"],
          None, words=("--width 18 is not a multiple of 4", "use 16 or 20")),
    Fault("bench-json-under-file", "export", lambda p: [*BENCH, p.tiny, "--json", p.afile / "b.json"],
          lambda p: p.afile / "b.json", words=("is a file",)),
    Fault("bench-plot-in-proc", "export", lambda p: [*BENCH, p.tiny, "--plot", "/proc/obsdiff-b.png"],
          lambda p: "/proc/obsdiff-b.png"),
    Fault("bench-run-record-garbage", "export", lambda p: [*BENCH, p.run_garbage],
          lambda p: p.run_garbage / "obsdiff.json", words=("not UTF-8 text",), upfront=False),
    Fault("bench-disk-full", "export", lambda p: [*BENCH, p.tiny, "--json", p.root / "b.json"],
          lambda p: p.root / "b.json", words=("ENOSPC", "nothing was written"), patch=disk_full_at("b.json"),
          upfront=False),
    Fault("bench-ctrl-c", "export", lambda p: [*BENCH, p.tiny, "--json", p.root / "b.json"],
          None, code=130, words=INTERRUPTED, patch=CTRL_C_IN_FORWARD, upfront=False),
    Fault("bench-out-of-memory", "export", lambda p: [*BENCH, p.tiny, "--json", p.root / "b.json"],
          None, words=(*OUT_OF_MEMORY, "lower --batch"),
          patch=allocation_fails_in(lambda: (sd3_class(), "forward")), upfront=False),
    # obsdiff-export triton
    Fault("triton-sidecar-truncated", "export", lambda p: ["triton", p.root / "export-truncated",
                                                           "--out", p.root / "repo"],
          lambda p: p.root / "export-truncated" / "transformer.json", words=("truncated JSON", "re-export")),
    Fault("triton-sidecar-without-file", "export", lambda p: ["triton", p.root / "export-no-file",
                                                              "--out", p.root / "repo"],
          lambda p: p.root / "export-no-file" / "transformer.json", words=("has no 'file'",)),
    Fault("triton-engine-sidecar-truncated", "export", lambda p: ["triton", p.root / "export-engine",
                                                                  "--out", p.root / "repo"],
          lambda p: p.root / "export-engine" / "transformer.plan.json", words=("truncated JSON",)),
    Fault("triton-out-under-file", "export", lambda p: ["triton", p.export, "--out", p.afile / "repo"],
          lambda p: p.afile / "repo", words=("is a file",)),
    Fault("triton-out-in-proc", "export", lambda p: ["triton", p.export, "--out", "/proc/obsdiff-repo"],
          lambda p: "/proc/obsdiff-repo"),
    Fault("triton-disk-full", "export", lambda p: ["triton", p.export, "--out", p.root / "repo"],
          lambda p: p.root / "repo", words=("ENOSPC", "nothing was written"), patch=disk_full_at("config.pbtxt"),
          upfront=False),
    Fault("triton-ctrl-c", "export", lambda p: ["triton", p.export, "--out", p.root / "repo"],
          lambda p: p.root / "repo", code=130, words=("the unfinished", "was removed"), upfront=False,
          patch=raising(KeyboardInterrupt, "obsdiff.export.triton:render_pbtxt")),
]


def mounted_tmpfs(p, name: str, options: str):
    """A tmpfs at p.root/name (also p.<name>) while the test runs; skips where mounting is not allowed."""
    path = p.root / name
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root in a privileged "
                    "environment")
    setattr(p, name, path)
    yield
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def locked_dir(p):
    """A directory this user may not write to: mode 555, and immutable (chattr +i) for root, who ignores modes."""
    path = p.root / "locked"
    path.mkdir()
    path.chmod(0o555)
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        path.chmod(0o755)
        pytest.skip("root writes anywhere, and chattr +i is not available here to stop it")
    p.locked = path
    yield
    if root:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


@pytest.fixture
def read_only_fs(p):
    yield from mounted_tmpfs(p, "ro", "ro,size=16k")


@pytest.fixture
def full_fs(p):
    """A 32 KiB file system: the tiny denoiser's 93 KiB of weights do not fit."""
    yield from mounted_tmpfs(p, "full", "size=32k")


def invoke(fault: Fault, args: list[str]) -> tuple[int, str, str]:
    if fault.subprocess:
        if fault.tool == "obsdiff":
            cmd = [sys.executable, "-m", "obsdiff", *args]
        else:
            module, func = export_entry_point()
            cmd = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.argv[0] = 'obsdiff-export'; "
                                         f"{func}()", *args]
        r = subprocess.run(cmd, capture_output=True, timeout=300, cwd=ROOT,  # bytes: text mode turns \r into \n
                           env=os.environ | {"OMP_NUM_THREADS": "1"})
        return r.returncode, r.stdout.decode(), r.stderr.decode()
    r = CliRunner().invoke(obsdiff_cli if fault.tool == "obsdiff" else export_cli(), args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows after printing `text`: \r returns to the start of the line, \n starts
    the next one, ESC[A (tqdm's move to an outer bar) goes up a line; other text overwrites what is there."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for token in re.split(r"(\r|\n|\x1b\[A)", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token:
            rows.extend([] for _ in range(row + 1 - len(rows)))
            line = rows[row]
            line.extend(" " * (col - len(line)))
            line[col:col + len(token)] = token
            col += len(token)
    return [text for text in ("".join(r).rstrip() for r in rows) if text.strip()]


# an unfinished tqdm bar: "desc:  40%|####      | 2/5 [...]"
UNFINISHED_BAR = re.compile(r"\b(\d|[1-9]\d)%\|")


def error_line(stderr: str, upfront: bool) -> str:
    """The one error line, last on the screen; no unfinished progress bar may be left there (finished ones record
    work that was done)."""
    lines = screen(stderr)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert not any(UNFINISHED_BAR.search(line) for line in lines), stderr
    if upfront:
        assert lines == errors, stderr
    return errors[0]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault_is_one_line_and_leaves_nothing(fault, p, request, monkeypatch):
    if fault.needs:
        request.getfixturevalue(fault.needs)
    if fault.patch:
        fault.patch(monkeypatch, p)
    before = snapshot(p.root)
    code, stdout, stderr = invoke(fault, [str(a) for a in fault.args(p)])
    assert "Traceback" not in stdout + stderr
    line = error_line(stderr, fault.upfront)
    assert code == fault.code, stderr
    assert fault.names is None or str(fault.names(p)) in line, line
    for word in fault.words:
        assert word in line, line
    after = snapshot(p.root)
    left = {name for name in after - before if not set(Path(name).parts) & set(fault.may_leave)}
    assert not left, f"left behind: {sorted(left)}"
    assert before <= after, f"removed: {sorted(before - after)}"


def test_every_command_has_rows_in_the_table():
    """A new command needs its faults here (ids start with the command's name)."""
    commands = set(obsdiff_cli.commands) | set(export_cli().commands)
    assert {c for c in commands if not any(f.id.startswith(f"{c}-") for f in FAULTS)} == set()
    assert len(commands) >= 10


def test_the_stand_in_export_is_served(p, tmp_path):
    """Control for the triton faults: the same export directory, unbroken, gives a repository."""
    r = CliRunner().invoke(export_cli(), ["triton", str(p.export), "--out", str(tmp_path / "repo")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "repo" / "transformer" / "config.pbtxt").is_file()


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "with-v"])
def test_a_bug_is_one_line_exit_1_and_a_traceback_only_with_v(verbose, p, monkeypatch):
    raising(ZeroDivisionError, lambda: (sd3_class(), "forward"))(monkeypatch, p)
    args = [*(["-v"] if verbose else []), *GEN, "--model", p.tiny, "--out", str(p.root / "x.png")]
    r = CliRunner().invoke(obsdiff_cli, args)
    assert r.exit_code == 1
    if verbose:  # the exception reaches the interpreter, which prints the traceback
        assert isinstance(r.exception, ZeroDivisionError)
    else:
        line = error_line(r.stderr, upfront=False)
        assert line == ("error: internal error: ZeroDivisionError: a bug (run with -v for the traceback; please "
                        "report it)")
    assert not (p.root / "x.png").exists()


@pytest.mark.parametrize("tool, args, words", [
    ("obsdiff", ["--bogus"], ("No such option '--bogus'", "(see cli --help)")),
    ("obsdiff", ["prune", "--out", "x"], ("Missing option '--model'", "(see cli prune --help)")),
    ("obsdiff", ["nope"], ("No such command 'nope'",)),
    ("export", ["onnx", "builtin:digits", "--opset", "x"], ("Invalid value for '--opset'",)),
], ids=["group-option", "missing-option", "unknown-command", "bad-value"])
def test_usage_errors_are_one_line(tool, args, words):
    r = CliRunner().invoke(obsdiff_cli if tool == "obsdiff" else export_cli(), args)
    assert r.exit_code == 2
    line = error_line(r.stderr, upfront=True)
    assert all(w in line for w in words), line


# ------------------------------------------------------------------------------------------ the helpers


@pytest.mark.parametrize("exc, code, words", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), 2, ("/data/x: Permission denied [EACCES]",
                                                                    "check its permissions")),
    (OSError(errno.ENOSPC, "No space left on device"), 2, ("No space left on device [ENOSPC]; the disk is full",)),
    (UnicodeDecodeError("utf-8", NOT_UTF8, 0, 1, "invalid start byte"), 2, ("not UTF-8 text (byte 0: invalid start",)),
    (json.JSONDecodeError("Expecting value", "[1, ", 4), 2, ("not valid JSON (line 1, column 5: Expecting value)",)),
    (KeyboardInterrupt(), 130, ("interrupted (Ctrl-C); no output was left half-written",)),
    (MemoryError(), 2, ("out of memory (host memory)", "use a smaller image size or batch")),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), 2,
     ("out of memory (tried to allocate 2.00 GiB on the GPU)",)),
    (type("OutOfMemoryError", (RuntimeError,), {})(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.06 GiB "
        "is free. Including non-PyTorch memory, this process has 76.12 GiB memory in use. If reserved but "
        "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"), 2,
     ("out of memory (tried to allocate 20.00 GiB on the GPU, 3.06 GiB free of 79.19 GiB); use a smaller",)),
    (RuntimeError(CPU_ALLOCATION_FAILED), 2, ("out of memory (tried to allocate 37.25 GiB on the CPU); use a",)),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes."), 2,
     ("out of memory (tried to allocate 1.00 GiB on the CPU)",)),
    (RuntimeError("CUDA error: out of memory"), 2, ("out of memory (CUDA error: out of memory)",)),
    (OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)), 2, ("out of memory",)),
    (ValueError("a bug"), None, ()),
    (RuntimeError("shapes cannot be multiplied"), None, ()),
], ids=["os-error-with-path", "os-error-without-path", "undecodable", "bad-json", "ctrl-c", "host-memory", "gpu-memory",
        "gpu-memory-in-full", "cpu-allocator", "cpu-allocator-windows", "cuda-error", "enomem", "bug", "runtime-bug"])
def test_failures_the_readers_did_not_anticipate(exc, code, words):
    from obsdiff.cli_utils import failure

    found = failure(exc)
    assert (found and found[1]) == code
    for word in words:
        assert word in found[0], found[0]


@pytest.mark.parametrize("command, advice", [
    ("prune", "lower --batch-size or --height/--width, give --max-memory GIB to plan calibration groups that fit"),
    ("generate", "lower --height/--width or choose another --device"),
    ("bench", "lower --batch or --height/--width"),
    ("info", "use a smaller image size or batch, or run on a device with more memory (--device)"),
])
def test_out_of_memory_advice_names_the_commands_options(command, advice):
    from obsdiff.cli_utils import failure

    message, code = failure(MemoryError(), command)
    assert code == 2 and message.startswith(f"out of memory (host memory); {advice}"), message


@pytest.mark.parametrize("content, expect, require, message", [
    (TRUNCATED, dict, None, r"unreadable \(truncated JSON; Unterminated string starting at: line 1 column 29\)"),
    ('{"a": 1} trailing', dict, None, r"unreadable \(not JSON; Extra data: line 1 column 10\)"),
    (NOT_UTF8, dict, None, r"unreadable \(not UTF-8 text: byte 0, invalid start byte\)"),
    ("[1]", dict, None, "holds an array, not an object"),
    ('{"format": "2"}', dict, {"format": int}, "'format' is a string, not an integer"),
    ('{"format": true}', dict, {"format": int}, "'format' is true or false, not an integer"),
    ('{"format": 2}', dict, {"format": int, "file": str}, "has no 'file'"),
    ("3", (dict, list), None, "holds an integer, not an object or an array"),
])
def test_read_json_names_the_file_and_the_fix(content, expect, require, message, tmp_path):
    path = tmp_path / "obsdiff.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BadFileError, match=message) as err:
        read_json(path, "run record", expect=expect, require=require, fix="re-run obsdiff prune")
    assert str(err.value).endswith("; re-run obsdiff prune") and "\n" not in str(err.value)


def test_read_json_returns_checked_values(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": 2, "file": "a.onnx", "n": null}')
    assert read_json(path, "x", require={"format": int, "file": str}) == {"format": 2, "file": "a.onnx", "n": None}
    assert check_json([1], path, "x", expect=(dict, list)) == [1]
    with pytest.raises(BadFileError, match=r"cannot read x .*: Is a directory \[EISDIR\]; it is a directory"):
        read_json(tmp_path, "x")


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                          (errno.ENOTDIR, "is a file, not a directory"),
                                          (errno.EACCES, "check its permissions")])
def test_os_error_message_names_the_path_and_what_to_do(code, advice):
    exc = OSError(code, os.strerror(code), "/tmp/.x.png.abc")
    assert os_error_message(exc) == f"/tmp/.x.png.abc: {os.strerror(code)} [{errno.errorcode[code]}]; " + \
        os_error_message(exc).split("; ", 1)[1]
    assert advice in os_error_message(exc)
    assert os_error_message(exc, "x.png", "could not write").startswith(f"could not write x.png: {os.strerror(code)}")


def test_first_line():
    assert first_line(RuntimeError("\n  first \nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("   \n ")) == "ValueError"


def wrapped(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("helper", [staged_dir, staged_file])
@pytest.mark.parametrize("make", [KeyboardInterrupt, enospc,
                                  lambda: RuntimeError("I/O error: No space left on device (os error 28)"),
                                  lambda: wrapped(RuntimeError("export failed"), enospc())],
                         ids=["ctrl-c", "enospc", "rust-io-error", "wrapped-by-an-exporter"])
def test_staged_writes_leave_nothing_and_name_the_output(helper, make, tmp_path):
    exc = make()
    out = tmp_path / "new" / "deeper" / "out"
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else OutputPathError
    with pytest.raises(expected) as err, helper(out) as tmp:
        (tmp / "half" if tmp.is_dir() else tmp).write_text("half")
        raise exc
    assert list(tmp_path.iterdir()) == []  # the staging and the parents made for it are gone
    if expected is OutputPathError:
        assert str(err.value).startswith(f"could not write {out}: No space left on device [ENOSPC]")
    else:
        assert getattr(err.value, "obsdiff_unfinished", ()) == (str(out),)


def test_a_forced_replacement_keeps_the_old_output_when_the_move_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and self.name.startswith(".run.") and ".replaced-" not in self.name:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputPathError, match=f"could not write {out}"), staged_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [q.name for q in tmp_path.iterdir()] == ["run"] and (out / "old.txt").read_text() == "old"


def test_an_input_error_inside_a_staged_write_stays_what_it_is(tmp_path):
    with pytest.raises(BadFileError, match="prompts file"), staged_dir(tmp_path / "out"):
        read_json(tmp_path / "missing.json", "prompts file")  # an OSError without the output's name, suppressed
    with pytest.raises(FileNotFoundError), staged_file(tmp_path / "out.png"):
        (tmp_path / "missing.txt").read_text()  # names another file: not the output's fault
    assert list(tmp_path.iterdir()) == []


def test_a_failure_inside_the_group_loop_leaves_no_progress_bar(tiny_sd3_dir, tmp_path):
    """The real entry point in a fresh interpreter, where a bar still open at exit redraws itself: a prune whose
    calibration fails inside the group loop (a bug in the pipeline call) shows its plan line and the error
    line, and no bar above, below or around them."""
    script = "\n".join([
        "import sys",
        "from diffusers import StableDiffusion3Pipeline",
        "def call(*args, **kwargs):",
        "    raise ZeroDivisionError('a bug')",
        "StableDiffusion3Pipeline.__call__ = call",
        "from obsdiff.cli import main",
        "sys.argv[0] = 'obsdiff'",
        "main()",
    ])
    cmd = [sys.executable, "-c", script, "prune", "--model", str(tiny_sd3_dir), "--method", "sparsegpt",
           "--sparsity", "0.5", "--num-prompts", "2", "--steps", "2", "--batch-size", "1", "--device", "cpu",
           "--dtype", "fp32", "--out", str(tmp_path / "r")]
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}  # the tiny tokenizers' warnings
    r = subprocess.run(cmd, capture_output=True, timeout=300, cwd=ROOT,  # bytes: text mode turns \r into \n
                       env=os.environ | quiet | {"OMP_NUM_THREADS": "1"})
    stderr = r.stderr.decode()
    assert r.returncode == 1, stderr
    assert "groups:" in stderr and "calibrate group 1/" in stderr  # the bars were drawn
    plan, *rest = screen(stderr)
    assert plan.startswith("plan: "), stderr
    assert rest == ["error: internal error: ZeroDivisionError: a bug (run with -v for the traceback; please report "
                    "it)"], stderr


def test_a_real_ctrl_c_during_calibration_exits_130_and_keeps_only_the_checkpoint(tiny_sd3_dir, tmp_path):
    """SIGINT to `python -m obsdiff prune` once it has started calibrating (no patching)."""
    import signal
    import time

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "obsdiff", "prune", "--model", str(tiny_sd3_dir), "--method", "sparsegpt",
           "--sparsity", "0.5", "--num-prompts", "64", "--steps", "50", "--batch-size", "1", "--groups", "1",
           "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out.with_name("r.partial") / "state.json").exists():  # the checkpoint exists: calibration runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    line = error_line(stderr, upfront=False)
    assert str(out.with_name("r.partial")) in line and "--resume" in line, line
    assert sorted(q.name for q in tmp_path.iterdir()) == ["r.partial"]
