"""Exports shared by several test modules (dynamo exports take seconds each)."""

import pytest

from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from tests.conftest import tiny_flux


@pytest.fixture(scope="session")
def flux_export(tmp_path_factory):
    """The tiny Flux transformer, fp32, dynamo exporter, 4..16 latent pixels and 8..32 text tokens."""
    out = tmp_path_factory.mktemp("flux") / "onnx"
    export_onnx(tiny_flux(), out, ExportConfig(dtype="fp32", height=(4, 8, 16), width=(4, 8, 16),
                                                text_len=(8, 16, 32)))
    return out
