from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "digit", "seven", "cat", "red", "7"]


def tiny_sd3(**kwargs):
    from obsdiff.models.sd3 import build_sd3_pipeline

    defaults = dict(num_layers=2, num_heads=2, head_dim=8, sample_size=8, vae_channels=(8, 16), seed=0)
    return build_sd3_pipeline(WORDS, **(defaults | kwargs))


FLUX_MSL = 16  # the tiny T5 tokenizer's model_max_length


def tiny_flux(**kwargs):
    defaults = dict(num_layers=2, num_single_layers=2, num_heads=2, head_dim=8, sample_size=8,
                    max_sequence_length=FLUX_MSL, seed=0)
    from obsdiff.models.flux import build_flux_pipeline

    pipe = build_flux_pipeline(WORDS, **(defaults | kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(**kwargs):
    defaults = dict(block_out_channels=(32, 64), layers_per_block=1, num_heads=2, sample_size=8, seed=0)
    from obsdiff.models.sdxl import build_sdxl_pipeline

    pipe = build_sdxl_pipeline(WORDS, **(defaults | kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs_before_and_after_reload(model, run):
    """Denoiser outputs of the in-memory `model` and of `run` loaded from disk on the same random inputs,
    and the reloaded model."""
    from obsdiff.runs.loading import load_pipeline

    inputs = model.family.example_inputs(model.denoiser, batch=2, text_len=16,
                                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.denoiser(**inputs, return_dict=False)[0]
        reloaded = load_pipeline(str(run))
        got = reloaded.denoiser(**inputs, return_dict=False)[0]
    return expected, got, reloaded


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random SD3 pipeline saved with save_pretrained (the layout users have on disk)."""
    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    tiny_sd3().save_pretrained(path, safe_serialization=True)
    return path
