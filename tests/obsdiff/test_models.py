import pytest
import torch

from obsdiff.errors import UnsupportedModelError
from obsdiff.models import FAMILIES, family_for_pipeline, get_family
from tests.conftest import tiny_sd3


def test_sd3_blocks_linears_and_shared_inputs():
    pipe = tiny_sd3(num_layers=3)
    fam = family_for_pipeline(pipe)
    assert fam.name == "sd3"
    blocks = fam.blocks(pipe.transformer)
    assert [b.name for b in blocks] == [f"transformer_blocks.{i}" for i in range(3)]
    first = fam.prunable_linears(blocks[0])
    assert list(first)[:3] == [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert "transformer_blocks.0.ff_context.net.2" in first
    assert not any("norm" in n for n in first), "adaLN linears must never be pruned"
    groups = fam.shared_input_groups(blocks[0])
    assert groups[0] == tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv")
    assert groups[1] == tuple(f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv")
    # Every prunable linear is in exactly one shared-input group.
    assert sorted(n for g in groups for n in g) == sorted(first)
    # The last SD3 block is context_pre_only: no text-stream output projection, no text FFN.
    last = fam.prunable_linears(blocks[-1])
    assert not any("to_add_out" in n or "ff_context" in n for n in last)
    assert len(last) == len(first) - 3


def test_sd35_dual_attention_gets_its_own_group():
    pipe = tiny_sd3(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")
    fam = family_for_pipeline(pipe)
    groups = fam.shared_input_groups(fam.blocks(pipe.transformer)[0])
    assert tuple(f"transformer_blocks.0.attn2.to_{x}" for x in "qkv") in groups
    assert ("transformer_blocks.0.attn2.to_out.0",) in groups


def test_example_inputs_run_the_denoiser():
    pipe = tiny_sd3()
    fam = get_family("sd3")
    inputs = fam.example_inputs(pipe.transformer, batch=3, text_len=16, generator=torch.Generator().manual_seed(0))
    out = pipe.transformer(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape == (3, 4, 8, 8)
    summary = fam.summary(pipe.transformer)
    # width 16, FFN 64: a full block has 6 q/k/v (16x16), 2 outputs (16x16) and two FFNs (2 x 64x16 each);
    # the context_pre_only last block lacks to_add_out and the text FFN
    full, last = 6 * 256 + 2 * 256 + 2 * 2 * 1024, 6 * 256 + 256 + 2 * 1024
    assert summary == {"family": "sd3", "denoiser": "SD3Transformer2DModel", "blocks": 2, "prunable_linears": 21,
                       "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
                       "prunable_parameters": full + last}


def test_unsupported_pipeline_lists_supported_families():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    with pytest.raises(UnsupportedModelError, match="supported families: sd3"):
        family_for_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    with pytest.raises(UnsupportedModelError, match="unknown model family 'flux2'"):
        get_family("flux2")
    assert "sd3" in FAMILIES
