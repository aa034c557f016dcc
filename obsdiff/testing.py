"""Random-weight denoisers and pipelines with the exact published denoiser configurations.

Real checkpoints cannot be downloaded here, yet memory planning, speed and CLI runs must be measured at
real widths. `SIZED_MODELS` holds the diffusers configs of the released denoisers (the `config.json` of
each checkpoint's `transformer/` or `unet/` folder); `sized_denoiser` builds one with random weights,
at full or reduced depth, on any device (`"meta"`: no memory, for counting parameters and bytes);
`sized_pipeline` wraps it in the family's diffusers pipeline with small random text encoders and VAE
whose *output* widths match the denoiser, so the stock pipeline call runs end to end.

Parameter counts at full depth (meta device, counted by the tests):

| name | class | parameters |
|---|---|---|
| sd3-medium | SD3Transformer2DModel | 2,028,328,000 (2.03 B) |
| sd3.5-large | SD3Transformer2DModel | 8,056,627,520 (8.06 B) |
| sd3.5-medium | SD3Transformer2DModel | 2,243,171,520 (2.24 B; 2.47 B with the saved position table) |
| flux.1-dev | FluxTransformer2DModel | 11,901,408,320 (11.9 B) |
| sdxl | UNet2DConditionModel | 2,567,463,684 (2.57 B) |

`width="narrow"` keeps every config field that shapes the graph (patching, position table, qk-norm, dual
attention, text and pooled embedding widths, rotary axes, guidance embedding; SDXL's three levels, block types,
addition embeddings, cross-attention width and linear projections) and shrinks only the number of heads and
the head width (`NARROW_WIDTHS`): the published graph, with one block 0.53 M parameters (SD3 / SD3.5-Large),
0.56 M (SD3.5-Medium), 5.1 M (Flux, one double and one single block) or 10.8 M (SDXL). Exports and generations
that depend on shapes (odd patch counts, the position-table crop) then run in seconds.

SD3 models also save their sin-cos position table (a persistent buffer): 56,623,104 values for
sd3-medium, 89,653,248 for sd3.5-large, 226,492,416 for sd3.5-medium (`pos_embed_max_size` 384).
Weights are random: outputs mean nothing, only shapes, memory and time are real.
"""

from __future__ import annotations

import torch

from obsdiff.errors import ConfigError

_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)

# name -> (diffusers class, family, exact denoiser config of the released checkpoint)
SIZED_MODELS: dict[str, tuple[str, str, dict]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3-medium": ("SD3Transformer2DModel", "sd3", _SD3_COMMON | dict(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192,
        dual_attention_layers=(), qk_norm=None)),
    # stabilityai/stable-diffusion-3.5-large
    "sd3.5-large": ("SD3Transformer2DModel", "sd3", _SD3_COMMON | dict(
        num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
        dual_attention_layers=(), qk_norm="rms_norm")),
    # stabilityai/stable-diffusion-3.5-medium (MMDiT-X: a second image-only attention in blocks 0-12)
    "sd3.5-medium": ("SD3Transformer2DModel", "sd3", _SD3_COMMON | dict(
        num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    # black-forest-labs/FLUX.1-dev
    "flux.1-dev": ("FluxTransformer2DModel", "flux", dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": ("UNet2DConditionModel", "sdxl", dict(
        sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=False,
        block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), num_attention_heads=None,
        dual_cross_attention=False, use_linear_projection=True, upcast_attention=None,
        resnet_time_scale_shift="default", addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, addition_embed_type_num_heads=64,
        time_embedding_type="positional", conv_in_kernel=3, conv_out_kernel=3)),
}

# Narrow widths per family: heads x head width only. SD3: caption_projection_dim is the hidden width (heads x
# head width) and must follow it. Flux: the rotary axes (16, 56, 56) fill the head, so the head width stays 128
# and only the heads drop. SDXL: `attention_head_dim` is the number of heads per level in this config (diffusers'
# legacy naming); heads of 32 instead of 64, and widths that GroupNorm's 32 groups divide.
NARROW_WIDTHS: dict[str, dict] = {
    "sd3": dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64),
    "flux": dict(num_attention_heads=2),
    "sdxl": dict(block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4)),
}
WIDTHS = ("published", "narrow")

# VAE latent statistics of the released VAEs (scaling/shift), with the real 8x spatial downsampling.
_VAE_CONFIG = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
    "sdxl": dict(scaling_factor=0.13025),
}
_VAE_CHANNELS = (8, 8, 16, 16)  # four levels: 2 ** 3 = 8x downsampling like the real VAEs

SIZED_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "on", "the", "hill", "painting",
               "portrait", "astronaut", "riding", "horse", "city", "at", "night"]


def _model_class(name: str):
    import diffusers

    if name not in SIZED_MODELS:
        raise ConfigError(f"unknown sized model {name!r}; choose one of {', '.join(SIZED_MODELS)}")
    cls_name, _, config = SIZED_MODELS[name]
    return getattr(diffusers, cls_name), dict(config)


def sized_config(name: str, num_layers: int | None = None, num_single_layers: int | None = None,
                 width: str = "published") -> dict:
    """`SIZED_MODELS[name]`'s config with the depth changed (None: the published depth), at the published
    width or `width="narrow"` (`NARROW_WIDTHS`: fewer and narrower heads, every other field as published).

    SD3/Flux: `num_layers` transformer blocks (Flux: double blocks; `num_single_layers` single blocks).
    SDXL: `num_layers` caps the transformer layers per down/up block (the mid block follows the last
    level), e.g. 1 gives `(1, 1, 1)` instead of `(1, 2, 10)`.
    """
    _, config = _model_class(name)
    family = SIZED_MODELS[name][1]
    for value, what in ((num_layers, "num_layers"), (num_single_layers, "num_single_layers")):
        if value is not None and value < (1 if what == "num_layers" else 0):
            raise ConfigError(f"{what}={value} is too small for {name}; use at least {int(what == 'num_layers')}")
    if num_single_layers is not None and family != "flux":
        raise ConfigError(f"num_single_layers is only for flux.1-dev, not {name}; leave it unset")
    if width not in WIDTHS:
        raise ConfigError(f"unknown width {width!r} for sized model {name}; use {' or '.join(WIDTHS)}")
    if width == "narrow":
        config |= NARROW_WIDTHS[family]
    if family == "sdxl":
        if num_layers is not None:
            config["transformer_layers_per_block"] = tuple(min(t, num_layers)
                                                           for t in config["transformer_layers_per_block"])
        return config
    if num_layers is not None:
        config["num_layers"] = num_layers
    if num_single_layers is not None:
        config["num_single_layers"] = num_single_layers
    return config


def sized_denoiser(name: str, num_layers: int | None = None, num_single_layers: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                   width: str = "published"):
    """The denoiser of `name` with its published config except depth (and width, if "narrow": see
    `sized_config`), random weights (seeded).

    Built directly on `device` in `dtype` (no float32 copy first); `device="meta"` allocates nothing.
    """
    cls, _ = _model_class(name)
    config = sized_config(name, num_layers, num_single_layers, width)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no float32 peak for bf16 models
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _text_config(family: str):
    """Small random encoders whose output widths are the released ones: CLIP-L 768 and CLIP-G 1280
    (pooled/projection), T5-XXL d_model 4096 (narrow heads and FFN keep it cheap)."""
    from obsdiff.models.text import TextStackConfig

    return TextStackConfig(clip_hidden=(768, 1280), clip_projection=(768, 1280), clip_layers=1, clip_heads=4,
                           t5_d_model=4096, t5_layers=1, t5_heads=4, t5_d_kv=16, t5_d_ff=64,
                           max_length=8 if family != "sdxl" else 77)


def sized_pipeline(name: str, num_layers: int | None = 2, num_single_layers: int | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0, words: list[str] | None = None,
                   width: str = "published"):
    """A complete diffusers pipeline whose denoiser is `sized_denoiser(name, ...)` (default depth 2).

    Text encoders and VAE are small and random, with the real output widths: pooled 2048 (SD3, two CLIP
    projections) or 768 (Flux, CLIP-L), T5 width 4096 (`joint_attention_dim`), SDXL cross-attention
    768 + 1280 = 2048 and text embeds 1280; VAE with 16 (SD3/Flux) or 4 (SDXL) latent channels, the real
    scaling/shift factors and 8x downsampling. The default image size is the real one (1024 px); pass
    small `height`/`width` to the call to keep runs cheap. Tokenizers use the in-memory vocabulary `words`.
    """
    denoiser = sized_denoiser(name, num_layers, num_single_layers, dtype=dtype, seed=seed, width=width)
    _, family, config = SIZED_MODELS[name]
    words = words or SIZED_WORDS
    text = _text_config(family)
    common = dict(vae_channels=_VAE_CHANNELS, vae_config=_VAE_CONFIG[family], text=text, seed=seed)
    if family == "sd3":
        from obsdiff.models.sd3 import build_sd3_pipeline

        pipe = build_sd3_pipeline(words, sample_size=config["sample_size"], latent_channels=config["in_channels"],
                                  transformer=denoiser, **common)
    elif family == "flux":
        from obsdiff.models.flux import build_flux_pipeline

        # Flux-dev: 1024 px default (128 latent pixels), T5 at most 512 tokens
        pipe = build_flux_pipeline(words, sample_size=128, latent_channels=config["in_channels"] // 4,
                                   max_sequence_length=512, transformer=denoiser, **common)
    else:
        from obsdiff.models.sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(words, sample_size=config["sample_size"], latent_channels=config["in_channels"],
                                   unet=denoiser, **common)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module) and part is not denoiser:
            part.to(dtype)
    return pipe
