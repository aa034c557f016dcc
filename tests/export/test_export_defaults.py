"""The export's defaults: precision, opset and TensorRT profile are the TensorRT diffusion demo's for the model.

Unit tests check each family's choice on stand-in configs of the released models (SD3-Medium, SD3.5-Medium,
SD3.5-Large, Flux.1-dev/schnell, SDXL) and on the tiny models; exports check that the choices reach the graph,
the sidecar and the command's output.
"""

import json
from types import SimpleNamespace as NS

import pytest
from click.testing import CliRunner

from obsdiff.errors import ConfigError
from obsdiff.export.cli import cli
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.models import get_family
from tests.conftest import tiny_flux, tiny_sd3, tiny_sdxl

CLIP = NS(model_max_length=77)


def sidecar(out, name="transformer"):
    return json.loads((out / f"{name}.json").read_text())


def sd3_pipe(**config):
    """A stand-in pipeline with an SD3-Medium transformer config (what `onnx_profile` reads), changed by `config`."""
    cfg = dict(qk_norm=None, dual_attention_layers=(), patch_size=2, pos_embed_max_size=192, sample_size=128)
    return NS(transformer=NS(config=NS(**cfg | config)), tokenizer=CLIP)


RELEASES = {  # stand-ins for the released models' configs, and what the demo builds them with
    "SD3-Medium": ("sd3", sd3_pipe(), "fp16", (2, 2, 8), (32, 128, 170), 333),
    "SD3.5-Large": ("sd3", sd3_pipe(qk_norm="rms_norm"), "bf16", (2, 2, 8), (32, 128, 170), 333),
    "SD3.5-Medium": ("sd3", sd3_pipe(qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
                                     pos_embed_max_size=384), "bf16", (2, 2, 8), (32, 128, 170), 333),
    "Flux.1-dev": ("flux", NS(transformer=NS(config=NS(guidance_embeds=True)), tokenizer_2=NS(model_max_length=512)),
                   "bf16", (1, 1, 4), (32, 128, 170), 512),
    "Flux.1-schnell": ("flux", NS(transformer=NS(config=NS(guidance_embeds=False)),
                                  tokenizer_2=NS(model_max_length=512)), "bf16", (1, 1, 4), (32, 128, 170), 256),
    "SDXL": ("sdxl", NS(unet=NS(config=NS(sample_size=128, block_out_channels=(320, 640, 1280))), tokenizer=CLIP),
             "fp16", (2, 2, 8), (32, 128, 168), 77),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_released_models_get_the_demos_precision_and_profile(release):
    family_name, pipe, dtype, batch, latent, text = RELEASES[release]
    family = get_family(family_name)
    chosen, why = family.onnx_dtype(family.denoiser(pipe))
    assert chosen == dtype and "TensorRT diffusion demo" in why and release in why
    profile = family.onnx_profile(pipe)
    assert profile.batch == batch and profile.images == (1, 1, 4)  # 1 to 4 images; x2 rows with CFG
    assert profile.height == profile.width == latent  # 256..1360 px images tuned for 1024, / 8
    assert profile.text == (text, text, text)  # fixed, as the demo's engines
    assert profile.source.startswith(f"TensorRT diffusion demo default for {release}: 1 to 4 images")
    assert set(profile.notes) <= {"height", "width", "text"}
    if release == "SDXL":  # the UNet needs multiples of 4: the demo's 170 is narrowed, and the sidecar says so
        assert "narrowed to 32:128:168 (multiples of 4)" in profile.notes["height"]


def test_profile_is_narrowed_to_what_the_model_takes_with_a_note():
    sd3 = get_family("sd3")
    tiny = sd3.onnx_profile(sd3_pipe(pos_embed_max_size=16, sample_size=8), max_sequence_length=8)
    assert tiny.height == (8, 8, 32) and tiny.text == (85, 85, 85)  # 77 CLIP + the pipeline's 8 T5 tokens
    assert "tuned for the model's default 8" in tiny.notes["height"]
    assert "at most 32, the position table covers 16 patches of 2" in tiny.notes["height"]
    assert sd3.onnx_profile(sd3_pipe(), guidance_scale=1.0).batch == (1, 1, 4)  # no CFG: one row per image
    flux = get_family("flux")
    short = flux.onnx_profile(NS(transformer=NS(config=NS(guidance_embeds=True)), tokenizer_2=NS(model_max_length=16)))
    assert short.text == (16, 16, 16) and "the T5 tokenizer's maximum" in short.notes["text"]


@pytest.mark.parametrize("make, dtype, release", [
    (lambda: tiny_sd3(), "fp16", "SD3-Medium"),
    (lambda: tiny_sd3(qk_norm="rms_norm"), "bf16", "SD3.5-Large"),
    (lambda: tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,)), "bf16", "SD3.5-Medium"),
    (lambda: tiny_flux(), "bf16", "Flux.1-schnell"),
    (lambda: tiny_flux(guidance_embeds=True), "bf16", "Flux.1-dev"),
    (lambda: tiny_sdxl(), "fp16", "SDXL"),
])
def test_default_dtype_follows_the_denoiser_config(make, dtype, release):
    from obsdiff.runs.loading import as_loaded

    model = as_loaded(make())
    chosen, why = model.family.onnx_dtype(model.denoiser)
    assert chosen == dtype and release in why
    cfg, choices = ExportConfig().resolve((chosen, why))
    assert cfg.dtype == dtype and cfg.opset == (22 if dtype == "bf16" else 18)
    assert choices["dtype"] == {"value": dtype, "requested": "auto", "why": why}


def test_config_defaults_are_auto_and_explicit_values_win():
    cfg = ExportConfig()
    assert (cfg.dtype, cfg.opset, cfg.batch) == ("auto", "auto", None) and not cfg.resolved
    assert ExportConfig(dtype="bf16").resolve()[0].opset == 22  # was refused without --opset 22
    assert ExportConfig(component_dtypes=(("vae", "bf16"),)).resolve(("fp16", "x"))[0].opset == 22
    explicit, choices = ExportConfig(dtype="fp32", opset=20).resolve(("bf16", "the model's"))
    assert (explicit.dtype, explicit.opset) == ("fp32", 20) and choices["opset"]["requested"] == 20
    assert ExportConfig(opset="19").opset == 19


@pytest.mark.parametrize("cfg, model_dtype, match", [
    (dict(opset=18), ("bf16", "demo says bf16"), r"--opset 18 cannot write bf16.*\(demo says bf16\).*--opset 22"),
    (dict(exporter="legacy"), ("bf16", "demo says bf16"), "legacy exporter stops at opset 20: use --exporter dynamo"),
    (dict(dtype="bf16", opset=20), None, "bf16 cannot be exported at opset 20"),
    (dict(opset="x"), None, "--opset 'x' is not a number or auto"),
])
def test_an_opset_below_what_the_precision_needs_is_refused(cfg, model_dtype, match):
    with pytest.raises(ConfigError, match=match):
        ExportConfig(**cfg).resolve(model_dtype)


def test_flux_opset_too_low_for_its_bf16_is_refused_before_exporting(tmp_path):
    with pytest.raises(ConfigError, match="--opset 18 cannot write bf16, the precision this model exports in"):
        export_onnx(tiny_flux(), tmp_path / "onnx", ExportConfig(opset=18, height=(4, 8, 8), width=(4, 8, 8)))
    assert list(tmp_path.iterdir()) == []


def test_default_export_records_its_choices(tmp_path):
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["onnx", "builtin:digits", "--out", str(out), "--exporter", "legacy"])
    assert r.exit_code == 0, r.output
    assert "dtype fp16: TensorRT diffusion demo default for SD3-Medium" in r.output
    assert "opset 18: the lowest opset" in r.output
    assert ("profile batch 2:2:8, height 8:8:32, width 8:8:32, text 16:16:16: TensorRT diffusion demo default for "
            "SD3-Medium") in r.output
    s = sidecar(out)
    assert s["dtype"] == "fp16" and s["opset"] == 18 and s["inputs"][0]["dtype"] == "float16"
    choices = s["choices"]
    assert choices["dtype"]["requested"] == "auto" and "SD3-Medium" in choices["dtype"]["why"]
    assert choices["opset"] == {"value": 18, "requested": "auto", "why": choices["opset"]["why"]}
    profile = choices["profile"]
    assert profile["ranges"] == {"batch": [2, 2, 8], "height": [8, 8, 32], "width": [8, 8, 32], "text": [16, 16, 16]}
    assert profile["given"] == [] and profile["source"].startswith("TensorRT diffusion demo default for SD3-Medium")
    assert "the position table covers 16 patches" in profile["notes"]["height"] and "154" in profile["notes"]["text"]
    # the graph's TensorRT profile is those ranges (what build-engine reads)
    assert s["inputs"][0]["profile"] == {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [8, 4, 32, 32]}
    assert s["inputs"][1]["shape"] == ["batch", 16, 64]  # text fixed: a static dim
    assert json.loads((out / "export.json").read_text())["choices"]["profile"] == profile


def test_bf16_without_opset_exports_at_opset_22(tmp_path):
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["onnx", "builtin:digits", "--out", str(out), "--dtype", "bf16", "--height", "8",
                                 "--width", "8", "--batch", "2"])
    assert r.exit_code == 0, r.output
    s = sidecar(out)
    assert s["dtype"] == "bf16" and s["opset"] == 22 and s["inputs"][0]["dtype"] == "bfloat16"
    assert s["choices"]["opset"]["requested"] == "auto" and "bfloat16 from 22" in s["choices"]["opset"]["why"]
    assert s["choices"]["dtype"] == {"value": "bf16", "requested": "bf16", "why": "given (--dtype)"}
    assert s["choices"]["profile"]["given"] == ["batch", "height", "width"]
    assert s["checks"]["parity"]["status"] == "passed"
    assert "opset 22: the lowest opset that writes bf16" in r.output and "dtype bf16" not in r.output


def test_flux_exports_in_bf16_with_one_row_per_image(tmp_path):
    out = tmp_path / "onnx"
    export_onnx(tiny_flux(), out, ExportConfig(height=(4, 8, 16), width=(4, 8, 16), parity=False))
    s = sidecar(out)
    assert s["dtype"] == "bf16" and s["opset"] == 22 and s["inputs"][0]["dtype"] == "bfloat16"
    profile = s["choices"]["profile"]
    assert profile["given"] == ["height", "width"] and profile["source"].startswith(
        "TensorRT diffusion demo default for Flux.1-schnell")
    assert profile["ranges"]["batch"] == [1, 1, 4] and profile["ranges"]["text"] == [16, 16, 16]
    assert set(profile["notes"]) == {"text"}  # the given ranges need no note
    assert s["checks"]["no_float64"]["status"] == "passed"


def test_sdxl_exports_in_fp16_and_its_vae_keeps_the_images_batch(tmp_path):
    pipe = tiny_sdxl()
    sizes = dict(exporter="legacy", height=(4, 8, 16), width=(4, 8, 16), parity=False)
    export_onnx(pipe, tmp_path / "unet", ExportConfig(**sizes))
    unet = sidecar(tmp_path / "unet", "unet")
    assert unet["dtype"] == "fp16" and unet["choices"]["dtype"]["why"].startswith("TensorRT diffusion demo default")
    assert unet["choices"]["profile"]["ranges"]["batch"] == [2, 2, 8] and unet["inputs"][0]["profile"]["max"][0] == 8
    export_onnx(pipe, tmp_path / "vae", ExportConfig(component="vae-decoder", **sizes))
    vae = sidecar(tmp_path / "vae", "vae_decoder")
    assert vae["choices"]["profile"]["ranges"]["batch"] == [1, 1, 4]  # images, not CFG rows
    assert vae["inputs"][0]["profile"]["max"][0] == 4
    assert vae["requested_dtype"] == "fp16" and vae["choices"]["dtype"]["value"] == vae["dtype"]
