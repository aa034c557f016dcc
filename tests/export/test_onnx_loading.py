"""`obsdiff-export onnx` loads only the components it exports: broken parts it does not export do not matter."""

import json
import shutil

import pytest

from obsdiff.errors import ModelLoadError
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.runs.loading import load_pipeline


@pytest.fixture(scope="module")
def broken_encoders(tiny_sd3_dir, tmp_path_factory):
    """The tiny SD3 pipeline with every text encoder's weights cut to 100 bytes."""
    path = tmp_path_factory.mktemp("broken") / "pipeline"
    shutil.copytree(tiny_sd3_dir, path)
    for folder in path.glob("text_encoder*"):
        for weights in folder.glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])
    return path


def test_the_corruption_breaks_a_full_load(broken_encoders):
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline"):
        load_pipeline(str(broken_encoders))


@pytest.mark.parametrize("component, stem", [("transformer", "transformer"), ("vae-decoder", "vae_decoder")])
def test_export_without_text_encoders_ignores_them(broken_encoders, tmp_path, component, stem):
    out = tmp_path / "onnx"
    report = export_onnx(str(broken_encoders), out, ExportConfig(component=component, exporter="legacy"))
    assert list(report["components"]) == [stem]
    assert report["components"][stem]["checks"]["parity"] == "passed"
    assert json.loads((out / f"{stem}.json").read_text())["component"] == stem
