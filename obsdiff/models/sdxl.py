"""SDXL family: `StableDiffusionXLPipeline` with a `UNet2DConditionModel` (text_time added conditioning).

Only the UNet's transformer blocks (`BasicTransformerBlock`, inside each `Transformer2DModel` of the
cross-attention down, mid and up blocks) are pruned: self-attention `attn1`, cross-attention `attn2`
(its k/v read the concatenated CLIP text states, of width `cross_attention_dim`) and a GEGLU feed-forward
whose `ff.net.0.proj` outputs 2 x inner features, value first and gate second (`GEGLU.forward`:
`hidden, gate = proj(x).chunk(2)`; `hidden * gelu(gate)`), so neuron i is rows i and i + inner.
Convolutions (ResNets, samplers), `proj_in`/`proj_out` of the Transformer2DModels, the time and added
embeddings, and norms are never pruned.

A UNet2DConditionModel without `addition_embed_type="text_time"` (SD 1.x/2.x) is not this family: its
pipeline encodes prompts differently.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from obsdiff.models.registry import (
    DEMO_GUIDANCE,
    Block,
    ImageSizeRule,
    ModelFamily,
    OnnxInput,
    OnnxIO,
    OnnxProfile,
    Slice,
    StructureGroup,
    demo_profile,
    embedding_kwargs,
    present_groups,
    range_dim,
    register_family,
    vae_scale_factor,
)

# SDXL's micro-conditioning: original size, crop top-left, target size (2 numbers each).
_N_TIME_IDS = 6
_GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")  # proj outputs (value, gate): one neuron owns two rows


def _attention_groups(attn: nn.Module, name: str) -> list[tuple[str, ...]]:
    """q/k/v of a self-attention read one tensor; a cross-attention's q reads the image, k/v the text."""
    if getattr(attn, "is_cross_attention", False):
        groups = [(f"{name}.to_q",), (f"{name}.to_k", f"{name}.to_v")]
    else:
        groups = [(f"{name}.to_q", f"{name}.to_k", f"{name}.to_v")]
    return groups + [(f"{name}.to_out.0",)]


def _downsampling(unet: nn.Module) -> int:
    """The UNet's total down-sampling factor: latent sizes must be multiples of it."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


@register_family
class SDXLFamily(ModelFamily):
    name = "sdxl"
    description = "Stable Diffusion XL (UNet)"
    denoiser_classes = ("UNet2DConditionModel",)
    denoiser_attr = "unet"

    def matches(self, pipeline) -> bool:
        if not super().matches(pipeline):
            return False
        return getattr(self.denoiser(pipeline).config, "addition_embed_type", None) == "text_time"

    def image_size_rule(self, vae_config: dict | None, denoiser_config: dict) -> ImageSizeRule:
        """Multiples of 8 (StableDiffusionXLPipeline.check_inputs, whatever the VAE) and of the VAE factor. The
        UNet takes any latent size: off its down-sampling multiples it passes the sizes to its up-samplers."""
        vae = vae_scale_factor(vae_config)
        return ImageSizeRule(math.lcm(8, vae), f"the pipeline's 8 and the VAE's factor {vae}")

    def blocks(self, denoiser: nn.Module) -> list[Block]:
        """Every BasicTransformerBlock in forward order: down blocks, the mid block, up blocks.

        (`named_modules()` alone would list the mid block last: the UNet registers it after `up_blocks`.)
        """
        parts = [("down_blocks", denoiser.down_blocks), ("mid_block", denoiser.mid_block),
                 ("up_blocks", denoiser.up_blocks)]
        names = []
        for prefix, part in parts:
            if part is None:
                continue
            names += [f"{prefix}.{n}" for n, m in part.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
        modules = dict(denoiser.named_modules())
        return [Block(i, name, modules[name]) for i, name in enumerate(names)]

    def shared_input_groups(self, block: Block) -> list[tuple[str, ...]]:
        mods = dict(block.module.named_modules())
        groups: list[tuple[str, ...]] = []
        for attn_name in ("attn1", "attn2"):
            attn = mods.get(attn_name)
            if attn is not None:
                groups += _attention_groups(attn, attn_name)
        groups += [("ff.net.0.proj",), ("ff.net.2",)]
        return present_groups(block, groups)

    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int = 1,
        height: int | None = None,
        width: int | None = None,
        text_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """`sample`, `timestep`, `encoder_hidden_states` and the nested `added_cond_kwargs` of SDXL.

        `text_len` defaults to CLIP's 77 tokens. `time_ids` are (original h, w, crop top, left, target h, w)
        in pixels as the pipeline makes them, assuming the usual 8x VAE; `text_embeds` has the width the
        added embedding expects after the 6 time ids.
        """
        cfg = denoiser.config
        param = next(denoiser.parameters())
        sample_size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        h = height or sample_size
        w = width or sample_size
        n_text = text_len or 77

        def to(x: torch.Tensor) -> torch.Tensor:
            return x.to(param.device, param.dtype)

        def randn(*shape):
            return to(torch.randn(*shape, generator=generator))

        text_embeds_dim = cfg.projection_class_embeddings_input_dim - _N_TIME_IDS * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]], dtype=torch.float32).repeat(batch, 1)
        return {
            "sample": randn(batch, cfg.in_channels, h, w),
            "timestep": to(torch.rand(batch, generator=generator) * 1000),
            "encoder_hidden_states": randn(batch, n_text, cfg.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": randn(batch, text_embeds_dim), "time_ids": to(time_ids)},
        }

    def structure_groups(self, block: Block) -> list[StructureGroup]:
        """Heads of attn1 and of attn2 (each its own group), and the feed-forward neurons.

        For GEGLU, neuron i is value row i and gate row inner + i of `ff.net.0.proj`: both must go.
        """
        mods = dict(block.module.named_modules())
        p = block.name + "."
        groups = []
        for attn_name in ("attn1", "attn2"):
            attn = mods.get(attn_name)
            if attn is None:
                continue
            head_dim = attn.to_q.out_features // attn.heads
            groups.append(StructureGroup(
                "heads", p + attn_name, attn.heads, head_dim, (Slice(p + f"{attn_name}.to_out.0"),),
                tuple(Slice(p + f"{attn_name}.to_{x}") for x in "qkv"), attention=p + attn_name))
        ff = mods.get("ff")
        if ff is not None:
            inner = ff.net[2].in_features
            writers = (Slice(p + "ff.net.0.proj", 0),)
            if type(ff.net[0]).__name__ in _GATED_ACTIVATIONS:
                writers += (Slice(p + "ff.net.0.proj", inner),)
            groups.append(StructureGroup("ffn", p + "ff", inner, 1, (Slice(p + "ff.net.2"),), writers))
        return groups

    def onnx_dtype(self, denoiser: nn.Module) -> tuple[str, str]:
        """fp16: the TensorRT diffusion demo always builds the SDXL UNet in fp16 (and keeps its VAE in fp32)."""
        return "fp16", "TensorRT diffusion demo default for SDXL (it builds the UNet in fp16)"

    def onnx_profile(self, pipeline, max_sequence_length: int | None = None,
                     guidance_scale: float | None = None) -> OnnxProfile:
        """The demo's batch and image ranges on multiples of the UNet's down-sampling factor; CLIP's fixed text
        length (the demo's 77)."""
        unet = self.denoiser(pipeline)
        n = getattr(getattr(pipeline, "tokenizer", None), "model_max_length", 77)
        rows = self.guidance_rows(DEMO_GUIDANCE if guidance_scale is None else guidance_scale)
        size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
        return demo_profile("SDXL", rows, (n, n, n), size, _downsampling(unet))

    def onnx_io(self, denoiser: nn.Module, ranges: dict[str, tuple[int, int, int]]) -> OnnxIO:
        """TensorRT demo names: sample, timestep, encoder_hidden_states, text_embeds, time_ids -> latent.

        Latent height/width must be multiples of the UNet's down-sampling factor (otherwise the up blocks
        take a data-dependent path). timestep and time_ids stay float32 in every precision.
        """
        cfg = denoiser.config
        b = range_dim("batch", ranges["batch"])
        h = range_dim("height", ranges["height"], _downsampling(denoiser))
        w = range_dim("width", ranges["width"], _downsampling(denoiser))
        t = range_dim("text", ranges["text"], what="--text-len")
        text_embeds_dim = cfg.projection_class_embeddings_input_dim - _N_TIME_IDS * cfg.addition_time_embed_dim
        return OnnxIO((
            OnnxInput("sample", "sample", (b, cfg.in_channels, h, w)),
            OnnxInput("timestep", "timestep", (b,), "float32"),
            OnnxInput("encoder_hidden_states", "encoder_hidden_states", (b, t, cfg.cross_attention_dim)),
            OnnxInput("text_embeds", "added_cond_kwargs.text_embeds", (b, text_embeds_dim)),
            OnnxInput("time_ids", "added_cond_kwargs.time_ids", (b, _N_TIME_IDS), "float32"),
        ), ranges=(b, h, w, t))

    @contextlib.contextmanager
    def onnx_export_context(self, denoiser: nn.Module):
        """The time-id embedding in the model's precision while exporting.

        `get_aug_embed` concatenates `text_embeds` (model dtype) with the sinusoidal embedding of the float32
        `time_ids`; eager PyTorch promotes the pair to float32 and casts the result back to the model dtype, but
        the exported Concat gets no Cast, so an fp16/bf16 graph is invalid ("Concat: inputs has inconsistent
        type"). Casting the embedding first computes the same values: the concatenation is cast anyway.
        """
        dtype = denoiser.dtype
        hook = denoiser.add_time_proj.register_forward_hook(lambda module, args, out: out.to(dtype))
        try:
            yield
        finally:
            hook.remove()

    def encode_prompts(self, pipeline, prompts: list[str], guidance_scale: float,
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Both CLIP encoders' penultimate states (concatenated) and the second encoder's pooled projection.

        With guidance > 1 the negative embeddings are included: zeros when the pipeline's
        `force_zeros_for_empty_prompt` is set (SDXL base), the encoded empty prompt otherwise.
        CLIP has a fixed length, so `max_sequence_length` is ignored.
        """
        cfg = guidance_scale > 1.0
        with torch.no_grad():
            emb, neg, pooled, neg_pooled = pipeline.encode_prompt(prompt=prompts, do_classifier_free_guidance=cfg)
        return embedding_kwargs(emb, pooled, neg, neg_pooled, cfg)




def build_sdxl_pipeline(
    words: list[str],
    *,
    block_out_channels: tuple[int, int] = (32, 64),
    layers_per_block: int = 1,
    transformer_layers_per_block: int | tuple[int, ...] = 1,
    num_heads: int = 2,
    sample_size: int = 8,
    latent_channels: int = 4,
    image_channels: int = 3,
    vae_channels: tuple[int, ...] = (8, 16),
    addition_time_embed_dim: int = 8,
    text=None,
    seed: int = 0,
    unet=None,
    vae_config: dict | None = None,
):
    """A complete `StableDiffusionXLPipeline` built from configs with random weights (no network).

    The UNet has SDXL's shape in miniature: a plain `DownBlock2D` then a `CrossAttnDownBlock2D`, a
    cross-attention mid block, and the mirrored up blocks; `num_heads` heads per attention (the UNet's
    `attention_head_dim` is, confusingly, a head count). `cross_attention_dim` is the sum of the two CLIP
    widths (their penultimate states are concatenated), and the added embedding reads the second
    encoder's projection plus 6 time ids of `addition_time_embed_dim` each. `sample_size` is the latent
    size; images are `sample_size * 2 ** (len(vae_channels) - 1)` pixels. `text`: a `TextStackConfig`
    (its T5 fields are unused). `unet`: a ready denoiser used instead of building one (its widths must
    match `text` and `latent_channels`); `vae_config`: extra VAE config (e.g. the real scaling factor).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from obsdiff.models.components import tiny_vae
    from obsdiff.models.text import TextStackConfig, clip_text_encoder, clip_tokenizer

    text = text or TextStackConfig()
    tokenizer = clip_tokenizer(words, text.max_length)
    tokenizer_2 = clip_tokenizer(words, text.max_length)
    text_encoder = clip_text_encoder(len(tokenizer), text.clip_hidden[0], text.clip_hidden[0], text, seed + 1,
                                     with_projection=False)
    text_encoder_2 = clip_text_encoder(len(tokenizer_2), text.clip_hidden[1], text.clip_projection[1], text, seed + 2)
    torch.manual_seed(seed)
    unet = unet or UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=transformer_layers_per_block,
        attention_head_dim=num_heads,
        use_linear_projection=True,
        cross_attention_dim=sum(text.clip_hidden),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=text.clip_projection[1] + _N_TIME_IDS * addition_time_embed_dim,
        norm_num_groups=min(32, block_out_channels[0]),
    )
    vae = tiny_vae(image_channels, latent_channels, vae_channels, sample_size, **(vae_config or {}))
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
