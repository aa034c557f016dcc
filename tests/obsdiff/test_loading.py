import json

import pytest

from obsdiff.errors import ModelLoadError
from obsdiff.runs.hub import resolve_model
from obsdiff.runs.loading import load_pipeline


def test_loads_a_pipeline_directory(tiny_sd3_dir):
    loaded = load_pipeline(str(tiny_sd3_dir))
    assert loaded.family.name == "sd3"
    assert type(loaded.pipeline).__name__ == "StableDiffusion3Pipeline"
    assert loaded.builtin is None and loaded.denoiser is loaded.pipeline.transformer


@pytest.mark.parametrize(
    "ref, message",
    [
        ("/nonexistent/model", "does not exist"),
        ("builtin:nope", "unknown builtin model builtin:nope; available: builtin:digits"),
    ],
)
def test_bad_model_values(ref, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(ref)


def test_file_and_non_pipeline_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_corrupt_checkpoint_is_a_load_error(tiny_sd3_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd3_dir, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline"):
        load_pipeline(str(broken))


def test_unknown_pipeline_class_is_a_load_error(tiny_sd3_dir, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_sd3_dir, odd)
    index = json.loads((odd / "model_index.json").read_text())
    index["_class_name"] = "NoSuchPipeline"
    (odd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline from .*NoSuchPipeline"):
        load_pipeline(str(odd))
