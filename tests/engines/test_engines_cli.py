"""`obsdiff-export build-engine` and `bench`: options and one-line errors (exit code 2)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from obsdiff.engines import trt_env
from obsdiff.engines.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    for f in fragments:
        assert f in r.output, r.output


def test_the_entry_point_has_every_command_and_the_export_group_stays_engine_free():
    from obsdiff.export.cli import cli as export_cli

    assert {"onnx", "triton", "build-engine", "bench"} <= set(cli.commands)
    assert "build-engine" not in export_cli.commands and "bench" not in export_cli.commands
    r = run("--help")
    assert r.exit_code == 0 and "build-engine" in r.output and "triton" in r.output


def test_commands_list_their_options():
    assert "--sparse-weights" in run("build-engine", "--help").output
    assert "--no-profile-from-sidecar" in run("build-engine", "--help").output
    assert "--strongly-typed / --weakly-typed" in run("build-engine", "--help").output
    help_text = "".join(run("bench", "--help").output.split())
    assert "torch-sparse24" in help_text and "--reference" in help_text and "--onnx" in help_text


def test_build_engine_missing_onnx(tmp_path):
    one_line_error(run("build-engine", tmp_path / "m.onnx", "--out", tmp_path / "m.plan"), "m.onnx does not exist",
                   "obsdiff-export onnx")


def test_build_engine_missing_sidecar(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"graph")
    one_line_error(run("build-engine", onnx, "--out", tmp_path / "m.plan"), "no export sidecar", "--opt-shapes")


def test_build_engine_existing_out_without_force(tmp_path, onnx_with_sidecar):
    (tmp_path / "m.plan").write_bytes(b"old engine")
    one_line_error(run("build-engine", onnx_with_sidecar(), "--out", tmp_path / "m.plan"), "already exists",
                   "--force")
    assert (tmp_path / "m.plan").read_bytes() == b"old engine"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt(tmp_path, onnx_with_sidecar):
    one_line_error(run("build-engine", onnx_with_sidecar(), "--out", tmp_path / "m.plan"), "TensorRT is not installed",
                   "pip install --extra-index-url https://pypi.nvidia.com tensorrt")
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_build_engine_without_gpu(tmp_path, onnx_with_sidecar, monkeypatch):
    monkeypatch.setattr(trt_env, "require_tensorrt", lambda: SimpleNamespace(__version__="10.8.0"))
    one_line_error(run("build-engine", onnx_with_sidecar(), "--out", tmp_path / "m.plan"), "need a CUDA GPU")


def test_build_engine_bad_shapes(tmp_path, onnx_with_sidecar):
    one_line_error(run("build-engine", onnx_with_sidecar(), "--out", tmp_path / "m.plan", "--opt-shapes",
                       "hidden_states=2x16"), "NAME:DxDx")


def test_bench_unknown_backend_and_missing_model(tmp_path):
    one_line_error(run("bench", "builtin:digits", "--backend", "torch,trt"), "unknown backend 'trt'")
    one_line_error(run("bench", tmp_path / "nothing"), "does not exist")
