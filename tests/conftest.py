from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "digit", "seven", "cat", "red", "7"]


def tiny_sd3(**kwargs):
    from obsdiff.models.sd3 import build_sd3_pipeline

    defaults = dict(num_layers=2, num_heads=2, head_dim=8, sample_size=8, vae_channels=(8, 16), seed=0)
    return build_sd3_pipeline(WORDS, **(defaults | kwargs))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random SD3 pipeline saved with save_pretrained (the layout users have on disk)."""
    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    tiny_sd3().save_pretrained(path, safe_serialization=True)
    return path
