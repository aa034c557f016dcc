"""Random-weight pipelines at the published widths (obsdiff.testing).

Full depth only on the meta device (no memory); real tensors only at depth 1-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obsdiff.errors import ConfigError
from obsdiff.testing import SIZED_MODELS, sized_config, sized_denoiser

ROOT = Path(__file__).resolve().parents[2]

# Exact parameter counts of the released denoisers (published: 2.03 B, 8.06 B, 11.9 B, 2.57 B).
PUBLISHED = {
    "sd3-medium": 2_028_328_000,
    "sd3.5-large": 8_056_627_520,
    "sd3.5-medium": 2_243_171_520,
    "flux.1-dev": 11_901_408_320,
    "sdxl": 2_567_463_684,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_depth_parameter_count_on_meta(name):
    model = sized_denoiser(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_published_widths_and_dtype_on_meta():
    sd35 = sized_denoiser("sd3.5-large", device="meta", dtype=torch.bfloat16)
    assert sd35.transformer_blocks[0].ff.net[2].weight.shape == (2432, 9728)
    assert sd35.transformer_blocks[0].attn.norm_q is not None  # qk rms_norm
    assert all(p.dtype == torch.bfloat16 for p in sd35.parameters())
    flux = sized_denoiser("flux.1-dev", device="meta")
    assert flux.single_transformer_blocks[0].proj_out.weight.shape == (3072, 15360)
    assert flux.config.guidance_embeds
    medium = sized_denoiser("sd3.5-medium", num_layers=14, device="meta")
    assert [b.attn2 is not None for b in medium.transformer_blocks] == [True] * 13 + [False]


def test_reduced_depth_keeps_widths():
    full = sized_config("sd3-medium")
    two = sized_config("sd3-medium", num_layers=2)
    assert two == full | {"num_layers": 2}
    assert sized_config("flux.1-dev", 1, 1) == sized_config("flux.1-dev") | {"num_layers": 1, "num_single_layers": 1}
    assert sized_config("sdxl", num_layers=1)["transformer_layers_per_block"] == (1, 1, 1)
    assert SIZED_MODELS["sdxl"][2]["transformer_layers_per_block"] == (1, 2, 10)  # the table is not mutated
    with pytest.raises(ConfigError, match="unknown sized model 'sd4'"):
        sized_config("sd4")
    with pytest.raises(ConfigError, match="num_single_layers"):
        sized_config("sd3-medium", num_single_layers=2)


# The only config fields a narrow width may change: the number of heads and the head width (SD3's caption
# projection is heads x head width; SDXL's heads per level and its channels, which are heads x head width).
NARROW_CHANGES = {"sd3": {"num_attention_heads", "attention_head_dim", "caption_projection_dim"},
                  "flux": {"num_attention_heads"}, "sdxl": {"block_out_channels", "attention_head_dim"}}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_narrow_width_keeps_the_published_graph(name):
    family = SIZED_MODELS[name][1]
    single = 1 if family == "flux" else None
    published, narrow = sized_config(name, 1, single), sized_config(name, 1, single, width="narrow")
    assert set(narrow) == set(published)
    assert {k for k in published if narrow[k] != published[k]} == NARROW_CHANGES[family]
    if family == "sd3":  # the model adds the caption projection to the hidden stream: same width
        assert narrow["caption_projection_dim"] == narrow["num_attention_heads"] * narrow["attention_head_dim"] < 1536
    elif family == "flux":  # the rotary axes fill the head: the head width stays, fewer heads
        assert sum(narrow["axes_dims_rope"]) == narrow["attention_head_dim"] == 128
        assert narrow["num_attention_heads"] in (1, 2)
    else:  # three levels; GroupNorm's groups and every level's heads divide its channels
        channels, heads = narrow["block_out_channels"], narrow["attention_head_dim"]
        assert len(channels) == len(published["block_out_channels"]) == 3 and channels < (320, 640, 1280)
        assert all(c % narrow["norm_num_groups"] == 0 and c % h == 0 for c, h in zip(channels, heads, strict=True))
    model = sized_denoiser(name, 1, single, width="narrow")
    full = sized_denoiser(name, 1, single, device="meta")
    # the same modules (blocks, qk-norms, dual attention, embedders, resnets), only narrower
    assert [n for n, _ in model.named_modules()] == [n for n, _ in full.named_modules()]
    params = sum(p.numel() for p in model.parameters())
    assert params < 12_000_000 and 50 * params < sum(p.numel() for p in full.parameters())
    with pytest.raises(ConfigError, match="unknown width 'thin'.*narrow"):
        sized_config(name, width="thin")


def test_sized_pipeline_tool_saves_a_narrow_pipeline(tmp_path):
    out = tmp_path / "sd35m"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sized_pipeline.py"), "sd3.5-medium", "--layers", "1",
                           "--narrow", "--dtype", "fp32", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sd3.5-medium, narrow: StableDiffusion3Pipeline" in proc.stdout
    saved = json.loads((out / "transformer" / "config.json").read_text())
    expected = sized_config("sd3.5-medium", 1, width="narrow")
    assert {k: saved[k] for k in expected} == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}


def test_seeded_weights_are_reproducible():
    a = sized_denoiser("sd3-medium", num_layers=1, seed=3)
    b = sized_denoiser("sd3-medium", num_layers=1, seed=3)
    assert torch.equal(a.transformer_blocks[0].attn.to_q.weight, b.transformer_blocks[0].attn.to_q.weight)


_GENERATE = """
import json, sys, time, torch
torch.set_num_threads(1)
from obsdiff.devices import peak_rss  # VmHWM: ru_maxrss would include the parent's size at fork
from obsdiff.testing import sized_pipeline
name, layers, single, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
t0 = time.perf_counter()
pipe = sized_pipeline(name, num_layers=layers, num_single_layers=int(single) if single != "-" else None, dtype=dtype)
pipe.set_progress_bar_config(disable=True)
t1 = time.perf_counter()
extra = {} if name == "sdxl" else {"max_sequence_length": 8}
out = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, guidance_scale=1.0,
           output_type="pt", generator=torch.Generator().manual_seed(0), **extra)
img = out.images
den = getattr(pipe, "transformer", None) or pipe.unet
print(json.dumps({"cls": type(pipe).__name__, "shape": list(img.shape), "finite": bool(torch.isfinite(img).all()),
                  "build_s": t1 - t0, "gen_s": time.perf_counter() - t1,
                  "rss_gb": peak_rss() / 1e9,
                  "vae_scale": pipe.vae_scale_factor, "vae": dict(pipe.vae.config),
                  "params": sum(p.numel() for p in den.parameters())}))
"""


def _generate(name: str, layers: int, single: int | None = None, dtype: str = "float32") -> dict:
    """Build and run the pipeline in a fresh process, so its peak RSS is its own."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _GENERATE, name, str(layers), str(single or "-"), dtype],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sd3_medium_width_pipeline_generates_one_step():
    r = _generate("sd3-medium", layers=2)
    assert r["cls"] == "StableDiffusion3Pipeline"
    assert r["shape"] == [1, 3, 64, 64] and r["finite"]
    assert r["params"] == 158_751_808  # 2 of SD3-Medium's blocks (the second is context_pre_only) + embedders
    assert r["vae_scale"] == 8
    assert (r["vae"]["latent_channels"], r["vae"]["scaling_factor"], r["vae"]["shift_factor"]) == (16, 1.5305, 0.0609)
    assert r["rss_gb"] < 2.0
    assert r["gen_s"] < 20.0  # generous: the step itself takes well under a second when the machine is quiet


def test_flux_dev_width_pipeline_generates_one_step():
    r = _generate("flux.1-dev", layers=1, single=1, dtype="bfloat16")  # bf16: 545 M parameters in ~1.1 GB
    assert r["cls"] == "FluxPipeline"
    assert r["shape"] == [1, 3, 64, 64] and r["finite"]
    assert r["params"] == 545_548_096
    assert (r["vae"]["latent_channels"], r["vae"]["scaling_factor"], r["vae"]["shift_factor"]) == (16, 0.3611, 0.1159)
    assert r["rss_gb"] < 2.0
