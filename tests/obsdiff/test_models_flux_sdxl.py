"""The Flux and SDXL family adapters on tiny random pipelines: layout, inputs, generation, pruning, structures."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from obsdiff.calibration.hooks import StepCounter
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.errors import UnsupportedModelError
from obsdiff.models import family_for_pipeline, get_family
from obsdiff.pruning.prune import prune_
from tests.conftest import FLUX_MSL, tiny_flux, tiny_sdxl

GUIDANCE = {"flux": 3.5, "sdxl": 5.0}
PROMPTS = ["a photo of a cat", "a red digit seven"]


BUILDERS = {"flux": tiny_flux, "sdxl": tiny_sdxl}


def small_inputs(name, fam, denoiser, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if name == "flux":
        return fam.example_inputs(denoiser, batch=batch, height=8, width=8, text_len=8, generator=gen)
    return fam.example_inputs(denoiser, batch=batch, text_len=8, generator=gen)


@torch.no_grad()
def forward(denoiser, inputs):
    return denoiser(**inputs, return_dict=False)[0]


def block_linears(block):
    """Every nn.Linear inside a block, by dotted name in the denoiser."""
    return {f"{block.name}.{n}": m for n, m in block.module.named_modules() if isinstance(m, nn.Linear)}


def check_layout(fam, denoiser):
    for block in fam.blocks(denoiser):
        prunable = fam.prunable_linears(block)
        flat = [n for g in fam.shared_input_groups(block) for n in g]
        assert len(flat) == len(set(flat)), f"{block.name}: a linear is in two shared-input groups"
        assert sorted(flat) == sorted(prunable), block.name
        assert all(isinstance(m, nn.Linear) for m in prunable.values())
        # Every other linear of the block is an adaLN modulation, which is never pruned.
        others = set(block_linears(block)) - set(prunable)
        assert all(".norm" in n for n in others), others
        assert not any(".norm" in n for n in prunable), "adaLN linears must never be pruned"


def check_forward_order(fam, denoiser, inputs):
    order = []
    blocks = fam.blocks(denoiser)
    handles = [b.module.register_forward_pre_hook(lambda m, a, name=b.name: order.append(name)) for b in blocks]
    try:
        forward(denoiser, inputs)
    finally:
        for h in handles:
            h.remove()
    assert order == [b.name for b in blocks]
    assert [b.index for b in blocks] == list(range(len(blocks)))


# ---- Flux -------------------------------------------------------------------------------------------------------


def test_flux_blocks_linears_and_shared_inputs():
    pipe = tiny_flux()
    fam = family_for_pipeline(pipe)
    assert fam.name == "flux" and get_family("flux") is fam
    blocks = fam.blocks(pipe.transformer)
    assert [b.name for b in blocks] == ["transformer_blocks.0", "transformer_blocks.1",
                                         "single_transformer_blocks.0", "single_transformer_blocks.1"]
    check_layout(fam, pipe.transformer)
    double = fam.shared_input_groups(blocks[0])
    p = "transformer_blocks.0."
    assert double == [tuple(p + f"attn.to_{x}" for x in "qkv"), tuple(p + f"attn.add_{x}_proj" for x in "qkv"),
                      (p + "attn.to_out.0",), (p + "attn.to_add_out",), (p + "ff.net.0.proj",), (p + "ff.net.2",),
                      (p + "ff_context.net.0.proj",), (p + "ff_context.net.2",)]
    p = "single_transformer_blocks.1."
    assert fam.shared_input_groups(blocks[3]) == [
        (p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"), (p + "proj_out",)]
    check_forward_order(fam, pipe.transformer, small_inputs("flux", fam, pipe.transformer))
    summary = fam.summary(pipe.transformer)
    assert summary["blocks"] == 4 and summary["prunable_linears"] == 2 * 12 + 2 * 5


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_example_inputs_run_the_denoiser(guidance_embeds):
    pipe = tiny_flux(num_layers=1, num_single_layers=1, guidance_embeds=guidance_embeds)
    fam = get_family("flux")
    inputs = fam.example_inputs(pipe.transformer, batch=3, height=8, width=6, text_len=16,
                                generator=torch.Generator().manual_seed(0))
    assert ("guidance" in inputs) == guidance_embeds
    assert inputs["img_ids"].shape == (4 * 3, 3) and inputs["txt_ids"].shape == (16, 3)
    assert 0 <= inputs["timestep"].min() <= inputs["timestep"].max() < 1
    out = forward(pipe.transformer, inputs)
    assert out.shape == inputs["hidden_states"].shape == (3, 4 * 3, 64)
    assert torch.isfinite(out).all()


def test_flux_pipeline_runs_on_encoded_prompts():
    pipe = tiny_flux()
    fam = get_family("flux")
    emb = fam.encode_prompts(pipe, PROMPTS, GUIDANCE["flux"], FLUX_MSL)
    # Guidance is embedded (or ignored): never a negative prompt.
    assert set(emb) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert emb["prompt_embeds"].shape == (2, FLUX_MSL, 64) and emb["pooled_prompt_embeds"].shape == (2, 32)
    counter = StepCounter()
    kwargs = dict(num_inference_steps=2, guidance_scale=GUIDANCE["flux"], output_type="latent")
    latents = pipe(**emb, **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                   callback_on_step_end=counter.on_step_end).images
    assert counter.step == 2
    assert latents.shape == (2, 4 * 4, 64)  # 8x8 latents packed in 2x2 patches of 16 channels
    # The same as generating from the text with the same T5 length.
    direct = pipe(prompt=PROMPTS, max_sequence_length=FLUX_MSL, **kwargs,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    torch.testing.assert_close(latents, direct)


# ---- SDXL -------------------------------------------------------------------------------------------------------


def test_sdxl_blocks_linears_and_shared_inputs():
    pipe = tiny_sdxl(transformer_layers_per_block=(1, 2))
    fam = family_for_pipeline(pipe)
    assert fam.name == "sdxl" and get_family("sdxl") is fam
    blocks = fam.blocks(pipe.unet)
    names = [b.name for b in blocks]
    assert names == [f"down_blocks.1.attentions.0.transformer_blocks.{i}" for i in range(2)] + [
        f"mid_block.attentions.0.transformer_blocks.{i}" for i in range(2)] + [
        f"up_blocks.0.attentions.{a}.transformer_blocks.{i}" for a in range(2) for i in range(2)]
    check_layout(fam, pipe.unet)
    p = names[0] + "."
    assert fam.shared_input_groups(blocks[0]) == [
        tuple(p + f"attn1.to_{x}" for x in "qkv"), (p + "attn1.to_out.0",), (p + "attn2.to_q",),
        (p + "attn2.to_k", p + "attn2.to_v"), (p + "attn2.to_out.0",), (p + "ff.net.0.proj",), (p + "ff.net.2",)]
    # Nothing outside the transformer blocks (convolutions, proj_in/proj_out, embeddings) is prunable.
    prunable = {n for b in blocks for n in fam.prunable_linears(b)}
    assert all(".transformer_blocks." in n for n in prunable)
    assert not any(n.endswith(("proj_in", "proj_out")) for n in prunable)
    check_forward_order(fam, pipe.unet, small_inputs("sdxl", fam, pipe.unet))


def test_sdxl_family_needs_text_time_conditioning():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        family_for_pipeline(SimpleNamespace(unet=unet))  # an SD 1.x-style UNet: not SDXL


def test_sdxl_example_inputs_run_the_denoiser():
    pipe = tiny_sdxl()
    fam = get_family("sdxl")
    inputs = fam.example_inputs(pipe.unet, batch=3, text_len=8, generator=torch.Generator().manual_seed(0))
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (3, 32)
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    out = forward(pipe.unet, inputs)
    assert out.shape == inputs["sample"].shape == (3, 4, 8, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sdxl_pipeline_runs_on_encoded_prompts(guidance):
    pipe = tiny_sdxl()
    fam = get_family("sdxl")
    emb = fam.encode_prompts(pipe, PROMPTS, guidance)
    expected = {"prompt_embeds", "pooled_prompt_embeds"}
    if guidance > 1:
        expected |= {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert set(emb) == expected
    assert emb["prompt_embeds"].shape == (2, 8, 64) and emb["pooled_prompt_embeds"].shape == (2, 32)
    counter = StepCounter()
    kwargs = dict(num_inference_steps=2, guidance_scale=guidance, output_type="latent")
    latents = pipe(**emb, **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                   callback_on_step_end=counter.on_step_end).images
    assert counter.step == 2 and latents.shape == (2, 4, 8, 8)
    direct = pipe(prompt=PROMPTS, **kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    torch.testing.assert_close(latents, direct)


# ---- both families: pruning and structures ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_prune_through_the_engine(name, pattern):
    pipe = BUILDERS[name]()
    fam = family_for_pipeline(pipe)
    denoiser = fam.denoiser(pipe)
    prunable = {n for b in fam.blocks(denoiser) for n in fam.prunable_linears(b)}
    kept = {k: v.clone() for k, v in denoiser.state_dict().items()
            if k.removesuffix(".weight").removesuffix(".bias") not in prunable}
    cfg = PruneConfig(sparsity=0.5) if pattern == "unstructured" else PruneConfig(sparsity_type=pattern)
    calib = CalibConfig(num_prompts=2, steps=2, batch_size=2, groups=2, guidance=GUIDANCE[name])
    report = prune_(pipe, cfg, calib, progress=False)
    assert report.family == name
    assert {r.name for r in report.pruned_layers} == prunable
    assert all(g.calib_calls > 0 for g in report.groups)
    modules = dict(denoiser.named_modules())
    for layer in prunable:
        w = modules[layer].weight.detach()
        if pattern == "unstructured":
            assert int((w == 0).sum()) == round(0.5 * w.numel()), layer
        else:
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), layer
    # Biases, adaLN, embedders, convolutions: untouched.
    after = denoiser.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in kept.items())
    assert torch.isfinite(forward(denoiser, small_inputs(name, fam, denoiser))).all()


def _zero(denoiser, group, i, side):
    """Zero structure i of `group`: its writer rows and bias entries, or its reader columns."""
    modules = dict(denoiser.named_modules())
    with torch.no_grad():
        for s in group.writers if side == "writers" else group.readers:
            lin = modules[s.linear]
            rows = slice(s.offset + i * group.size, s.offset + (i + 1) * group.size)
            if side == "writers":
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            else:
                lin.weight[:, rows] = 0


def _check_tiling(fam, block, denoiser):
    """The groups' column ranges tile every reader's input and their row ranges every writer's output."""
    modules = dict(denoiser.named_modules())
    cols, rows = {}, {}
    for g in fam.structure_groups(block):
        for s in g.readers:
            cols.setdefault(s.linear, []).append((s.offset, s.offset + g.count * g.size))
        for s in g.writers:
            rows.setdefault(s.linear, []).append((s.offset, s.offset + g.count * g.size))
        if g.kind == "heads":
            attn = modules[g.attention]
            assert g.count == attn.heads
            # Writers: every projection of the attention that is not an output projection (q, k and v).
            projections = {f"{g.attention}.{n}" for n, m in attn.named_modules() if isinstance(m, nn.Linear)}
            assert {s.linear for s in g.writers} == projections - {s.linear for s in g.readers}
            assert g.count * g.size == modules[g.writers[0].linear].out_features  # heads * head_dim == inner
    for spans, size in ((cols, "in_features"), (rows, "out_features")):
        for name, ranges in spans.items():
            ranges.sort()
            assert ranges[0][0] == 0 and ranges[-1][1] == getattr(modules[name], size), (name, ranges)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), (name, ranges)


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_structure_groups_zero_writers_equals_zero_readers(name):
    pipe = BUILDERS[name](**({"num_layers": 1, "num_single_layers": 1} if name == "flux" else {}))
    fam = family_for_pipeline(pipe)
    denoiser = fam.denoiser(pipe)
    inputs = small_inputs(name, fam, denoiser)
    dense = {k: v.clone() for k, v in denoiser.state_dict().items()}
    base = forward(denoiser, inputs)
    modules = dict(denoiser.named_modules())
    kinds = set()
    for block in fam.blocks(denoiser):
        groups = fam.structure_groups(block)
        assert groups, block.name
        _check_tiling(fam, block, denoiser)
        if name == "flux" and block.name.startswith("single"):
            proj_out, proj_mlp = modules[block.name + ".proj_out"], modules[block.name + ".proj_mlp"]
            heads = next(g for g in groups if g.kind == "heads")
            assert proj_out.in_features == heads.count * heads.size + proj_mlp.out_features
        for g in groups:
            kinds.add((g.kind, len(g.writers)))
            for i in sorted({0, g.count - 1}):
                _zero(denoiser, g, i, "writers")
                by_writers = forward(denoiser, inputs)
                denoiser.load_state_dict(dense)
                _zero(denoiser, g, i, "readers")
                by_readers = forward(denoiser, inputs)
                denoiser.load_state_dict(dense)
                torch.testing.assert_close(by_writers, by_readers, atol=1e-5, rtol=0, msg=f"{g.name} #{i}")
                assert (by_writers - base).abs().max() > 1e-6, f"{g.name} #{i} changes nothing"
    if name == "sdxl":
        assert ("ffn", 2) in kinds  # GEGLU: value and gate rows
    else:
        assert {("heads", 6), ("heads", 3), ("ffn", 1)} <= kinds  # joint heads, single-block heads, FFNs
