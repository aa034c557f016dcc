"""Symbolic shape arithmetic survives export: odd patch counts through SD3's cropped position table.

SD3-Medium and SD3.5-Large (pos_embed_max_size 192) once failed parity at every odd patch count because the
exporter lowered `//` on dimensions to truncating integer division. A two-head, one-block transformer with
the published graph-shaping fields reproduces it in seconds.
"""

import json
import operator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from obsdiff.export.config import ExportConfig
from obsdiff.export.lowering import custom_translations, floor_divide
from obsdiff.export.onnx_export import export_onnx
from obsdiff.models.registry import get_family
from obsdiff.runs.loading import LoadedModel
from obsdiff.testing import SIZED_MODELS


def _narrow_sd3(name: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    config = dict(SIZED_MODELS[name][2], num_layers=1, num_attention_heads=2, attention_head_dim=16,
                  caption_projection_dim=32)
    torch.manual_seed(0)
    return SD3Transformer2DModel(**config).eval()


def _loaded(denoiser) -> LoadedModel:
    pipeline = SimpleNamespace(transformer=denoiser, tokenizer=SimpleNamespace(model_max_length=77))
    return LoadedModel(ref="narrow-sd3", path=Path("."), pipeline=pipeline, family=get_family("sd3"))


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-large"])
def test_odd_patch_counts_pass_parity(name, tmp_path):
    denoiser = _narrow_sd3(name)
    assert denoiser.config.pos_embed_max_size == 192
    # traced at 64 patches; parity at 32 and at 65 (latent 130, a 1040 px image)
    cfg = ExportConfig(dtype="fp32", opset=18, batch=(1, 1, 2), height=(64, 128, 256), width=(64, 128, 256),
                       text_len=(8, 8, 16))
    export_onnx(_loaded(denoiser), tmp_path / "onnx", cfg, progress=False)
    parity = json.loads((tmp_path / "onnx" / "transformer.json").read_text())["checks"]["parity"]
    assert parity["status"] == "passed"
    assert {p["height"] for p in parity["points"]} >= {130}


def test_floor_divide_rounds_toward_negative_infinity():
    from onnx.reference import ReferenceEvaluator

    class Div(torch.nn.Module):
        def forward(self, x):
            h = x.shape[0]
            return x.new_zeros((96 + h + (-h) // 2,))  # the slice end sympy writes for SD3's crop

    dim = torch.export.Dim("h", min=2, max=200)
    program = torch.onnx.export(Div(), (torch.zeros(64),), dynamic_shapes=({0: dim},), dynamo=True,
                                custom_translation_table=custom_translations(18), verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    run = ReferenceEvaluator(model)
    for h in (63, 64, 65, 131):
        (out,) = run.run(None, {model.graph.input[0].name: np.zeros(h, np.float32)})
        assert out.shape == (96 + h + (-h) // 2,), h
    assert set(custom_translations(22)) == {operator.floordiv}
    assert callable(floor_divide(18))
