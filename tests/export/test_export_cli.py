"""`obsdiff-export onnx` / `triton` from the command line: options, and one-line errors for bad input.

Every bad input exits with code 2, prints one `error: ...` line and leaves no output directory.
"""

import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from obsdiff.export.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *fragments):
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("command, option", [("onnx", "--linear-as-gemm"), ("onnx", "--component-dtype"),
                                             ("onnx", "--external-data"), ("triton", "--out"),
                                             ("triton", "--engine")])
def test_export_commands_are_listed_with_options(command, option):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and option in r.output


@pytest.mark.parametrize("args, fragments", [
    (["--component", "unet-encoder"], ["unknown component 'unet-encoder'", "transformer, vae-decoder"]),
    (["--dtype", "bf16", "--opset", "18"], ["bf16 cannot be exported at opset 18", "--opset 22"]),
    (["--dtype", "bf16", "--exporter", "legacy"], ["legacy exporter stops at opset 20", "--exporter dynamo"]),
    (["--opset", "x"], ["Invalid value for '--opset'", "'x' is not a number or auto"]),
    (["--dtype", "bf16", "--opset", "20", "--exporter", "legacy"], ["legacy exporter stops at opset 20"]),
    (["--component-dtype", "vae-decoder=int8"], ["unknown dtype 'int8'"]),
    (["--component-dtype", "decoder=fp16"], ["unknown component"]),
    (["--opset", "17"], ["--opset 17", "use --opset 18 or 20"]),
    (["--batch", "4:2:8"], ["--batch '4:2:8'", "MIN <= OPT <= MAX"]),
    (["--height", "a:b"], ["--height 'a:b' is not MIN:OPT:MAX"]),
    (["--height", "4:7:16"], ["7 is not a multiple of 2"]),
    (["--height", "4:8:64"], ["exceeds this model's limit of 32"]),
])
def test_bad_options_are_one_line_errors(args, fragments, tmp_path):
    r = run("onnx", "builtin:digits", "--out", tmp_path / "onnx", *args)
    one_line_error(r, *fragments)
    assert not (tmp_path / "onnx").exists()


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "mine.txt").write_text("keep")
    one_line_error(run("onnx", "builtin:digits", "--out", tmp_path / "onnx"), "already exists", "--force")
    assert (tmp_path / "onnx" / "mine.txt").read_text() == "keep"


def test_broken_run_directories(tiny_sd3_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # neither obsdiff.json nor a pipeline
    one_line_error(run("onnx", run_dir, "--out", tmp_path / "a"), "not a diffusers pipeline directory")
    (run_dir / "obsdiff.json").write_text(json.dumps({"base_model": str(tiny_sd3_dir), "family": "sd3",
                                                      "denoiser_file": "denoiser/diffusion_pytorch_model.safetensors"}))
    (run_dir / "denoiser").mkdir()
    shutil.copy(tiny_sd3_dir / "transformer" / "config.json", run_dir / "denoiser" / "config.json")
    one_line_error(run("onnx", run_dir, "--out", tmp_path / "b"), "lacks its weights")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_onnx_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = run("onnx", "builtin:digits", "--out", tmp_path / "onnx")
    one_line_error(r, "onnxruntime is needed", 'pip install "obsdiff[onnx]"')
    assert not (tmp_path / "onnx").exists()


def test_triton_needs_an_export_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("triton", tmp_path / "empty", "--out", tmp_path / "repo"), "no ONNX export sidecars")
    one_line_error(run("triton", tmp_path / "nowhere", "--out", tmp_path / "repo"), "is not a directory")
    assert not (tmp_path / "repo").exists()
