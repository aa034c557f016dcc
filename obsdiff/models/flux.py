"""Flux family: `FluxPipeline` with a `FluxTransformer2DModel` (MMDiT double blocks, then single blocks).

Double blocks (`transformer_blocks.*`, `FluxTransformerBlock`) have the SD3 layout: an image stream
(`attn.to_*`, `ff`) and a text stream (`attn.add_*`, `ff_context`) sharing one joint attention, with
gelu-tanh feed-forwards (`ff.net.0.proj` is a plain up projection, not a gated one).

Single blocks (`single_transformer_blocks.*`, `FluxSingleTransformerBlock`) run on the concatenated text
and image tokens: one adaLN output feeds both `attn.to_q/k/v` and the MLP up projection `proj_mlp`, and
`proj_out` reads `cat(attention output [dim], gelu(proj_mlp) [mlp_width])`. So attention heads own
proj_out's first `dim` columns and MLP neurons the columns after them.

adaLN linears (`norm1.linear`, `norm1_context.linear`, `norm.linear`), embedders, `norm_out` and the
model's final `proj_out` are never pruned. The rotary embedding is computed in float64 on CPU (cast back
to float32 before use), which matters for export, not for pruning.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from obsdiff.models import mmdit
from obsdiff.models.registry import (
    Block,
    ImageSizeRule,
    ModelFamily,
    OnnxDim,
    OnnxInput,
    OnnxIO,
    OnnxProfile,
    Slice,
    StructureGroup,
    demo_profile,
    present_groups,
    range_dim,
    register_family,
    vae_scale_factor,
)

# FluxSingleTransformerBlock: q/k/v and the MLP up projection all read norm(hidden_states).
_SINGLE_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    ("proj_out",),  # cat(attention output, gelu(proj_mlp output))
)

# What `FluxPipeline` uses when the caller gives no size: 128 latent pixels (1024 px images), 512 T5 tokens.
_DEFAULT_LATENT_SIZE = 128
_DEFAULT_TEXT_LEN = 512
# The T5 tokens TensorRT's diffusion demo gives each release (demo_txt2img_flux.py, max_seq_supported_by_model).
_DEMO_TEXT_LEN = {"Flux.1-dev": 512, "Flux.1-schnell": 256}




def _release(cfg) -> str:
    """Flux.1-dev embeds the guidance scale (guidance-distilled); Flux.1-schnell does not take one."""
    return "Flux.1-dev" if getattr(cfg, "guidance_embeds", False) else "Flux.1-schnell"


def _is_single(block: Block) -> bool:
    return block.name.startswith("single_transformer_blocks.")


@register_family
class FluxFamily(ModelFamily):
    name = "flux"
    description = "Flux (MMDiT double + single blocks)"
    denoiser_classes = ("FluxTransformer2DModel",)
    denoiser_attr = "transformer"

    def blocks(self, denoiser: nn.Module) -> list[Block]:
        names = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
        names += [f"single_transformer_blocks.{j}" for j in range(len(denoiser.single_transformer_blocks))]
        modules = list(denoiser.transformer_blocks) + list(denoiser.single_transformer_blocks)
        return [Block(i, name, module) for i, (name, module) in enumerate(zip(names, modules, strict=True))]

    def next_block_inputs(self, output, inputs: dict) -> dict:
        return mmdit.next_block_inputs(output, inputs)

    def shared_input_groups(self, block: Block) -> list[tuple[str, ...]]:
        return present_groups(block, _SINGLE_INPUT_GROUPS if _is_single(block) else mmdit.INPUT_GROUPS)

    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int = 1,
        height: int | None = None,
        width: int | None = None,
        text_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One forward's keyword arguments, shaped as `FluxPipeline` builds them.

        `height`/`width` are the unpacked latent size (even numbers); the config has no sample size, so
        they default to the pipeline's 128 (1024 px images), and `text_len` to its 512 T5 tokens: tiny
        models should pass small values. Latents are packed into 2x2 patches: `hidden_states` is
        (batch, (h/2)*(w/2), in_channels). Position ids are 2-D (tokens, 3) as diffusers 0.42 expects:
        zeros for text, (0, row, col) for image patches. `timestep` is in [0, 1) (the pipeline passes
        t / 1000); `guidance` is given only to guidance-distilled models (`guidance_embeds`).
        """
        cfg = denoiser.config
        param = next(denoiser.parameters())
        h = height or _DEFAULT_LATENT_SIZE
        w = width or _DEFAULT_LATENT_SIZE
        n_text = text_len or _DEFAULT_TEXT_LEN

        def to(x: torch.Tensor) -> torch.Tensor:
            return x.to(param.device, param.dtype)

        def randn(*shape):
            return to(torch.randn(*shape, generator=generator))

        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        inputs = {
            "hidden_states": randn(batch, (h // 2) * (w // 2), cfg.in_channels),
            "encoder_hidden_states": randn(batch, n_text, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
            "timestep": to(torch.rand(batch, generator=generator)),
            "img_ids": to(img_ids.reshape(-1, 3)),
            "txt_ids": to(torch.zeros(n_text, 3)),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = to(1.0 + 4.0 * torch.rand(batch, generator=generator))
        return inputs

    def structure_groups(self, block: Block) -> list[StructureGroup]:
        """Double blocks: joint heads, image FFN, text FFN (as SD3). Single blocks: heads and MLP neurons.

        In a single block both structures are read by the one `proj_out`: heads own its columns
        [h * head_dim, (h + 1) * head_dim) and q/k/v rows; neuron j owns column dim + j and row j of
        `proj_mlp` (gelu-tanh(0) = 0, so a zero row silences the neuron).
        """
        if not _is_single(block):
            return mmdit.structure_groups(block)
        mods = dict(block.module.named_modules())
        p = block.name + "."
        attn = mods["attn"]
        writers = tuple(Slice(p + f"attn.to_{x}") for x in "qkv")
        return [
            StructureGroup("heads", p + "attn", attn.heads, attn.head_dim, (Slice(p + "proj_out", 0),), writers,
                           attention=p + "attn"),
            StructureGroup("ffn", p + "proj_mlp", mods["proj_mlp"].out_features, 1,
                           (Slice(p + "proj_out", attn.heads * attn.head_dim),), (Slice(p + "proj_mlp", 0),)),
        ]

    def onnx_dtype(self, denoiser: nn.Module) -> tuple[str, str]:
        """bf16: the TensorRT diffusion demo's published Flux ONNX files are bf16 (or fp8/fp4); its native fp16
        export, what it builds without --bf16, is documented as needing more than 48 GB."""
        return "bf16", (f"TensorRT diffusion demo precision for {_release(denoiser.config)}: its published Flux "
                        "ONNX files are bf16 (it exports fp16 natively only without --bf16)")

    def onnx_profile(self, pipeline, max_sequence_length: int | None = None,
                     guidance_scale: float | None = None) -> OnnxProfile:
        """The demo's batch and image ranges (one row per image: guidance is an input, not a second row); text
        fixed at the demo's T5 length for the release, within the tokenizer's maximum, or at the pipeline's."""
        release = _release(self.denoiser(pipeline).config)
        tokenizer_max = getattr(getattr(pipeline, "tokenizer_2", None), "model_max_length", None)
        demo = _DEMO_TEXT_LEN[release]
        n = max_sequence_length or min(demo, tokenizer_max or demo)
        note = None if n == demo else (
            f"fixed at {n} tokens, the pipeline's max_sequence_length" if max_sequence_length
            else f"fixed at {n} tokens, the T5 tokenizer's maximum (the demo's {demo} is more)")
        native = getattr(pipeline, "default_sample_size", None) or _DEFAULT_LATENT_SIZE
        return demo_profile(release, 1, (n, n, n), native, 2, text_note=note)

    def onnx_io(self, denoiser: nn.Module, ranges: dict[str, tuple[int, int, int]]) -> OnnxIO:
        """TensorRT demo names: hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
        txt_ids (and guidance for guidance-distilled models) -> latent.

        The image sequence is (height/2) * (width/2) packed tokens: its profile is derived from the
        height/width ranges. Ids, timestep and guidance stay float32 in every precision.
        """
        cfg = denoiser.config
        b = range_dim("batch", ranges["batch"])
        h = range_dim("height", ranges["height"], 2)
        w = range_dim("width", ranges["width"], 2)
        tok = OnnxDim("image_tokens", *((hh // 2) * (ww // 2) for hh, ww in zip(h.values(), w.values(), strict=True)))
        t = range_dim("text", ranges["text"], what="--text-len")
        inputs = [
            OnnxInput("hidden_states", "hidden_states", (b, tok, cfg.in_channels)),
            OnnxInput("encoder_hidden_states", "encoder_hidden_states", (b, t, cfg.joint_attention_dim)),
            OnnxInput("pooled_projections", "pooled_projections", (b, cfg.pooled_projection_dim)),
            OnnxInput("timestep", "timestep", (b,), "float32"),
            OnnxInput("img_ids", "img_ids", (tok, 3), "float32"),
            OnnxInput("txt_ids", "txt_ids", (t, 3), "float32"),
        ]
        if cfg.guidance_embeds:
            inputs.append(OnnxInput("guidance", "guidance", (b,), "float32"))
        return OnnxIO(tuple(inputs), ranges=(b, h, w, t))

    @contextlib.contextmanager
    def onnx_export_context(self, denoiser: nn.Module):
        """Compute the rotary embedding in float32 while exporting: diffusers uses float64 on CPU, which
        TensorRT cannot run. Positions are small integers, so float32 phases differ by ~1e-7 relative."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos_embed = denoiser.pos_embed

        def forward_fp32(ids: torch.Tensor):
            pos = ids.float()
            pairs = [get_1d_rotary_pos_embed(dim, pos[:, i], theta=pos_embed.theta, repeat_interleave_real=True,
                                             use_real=True, freqs_dtype=torch.float32)
                     for i, dim in enumerate(pos_embed.axes_dim)]
            return torch.cat([c for c, _ in pairs], dim=-1), torch.cat([s for _, s in pairs], dim=-1)

        pos_embed.forward = forward_fp32
        try:
            yield
        finally:
            del pos_embed.forward

    def latents_for_vae(self, pipeline, latents: torch.Tensor, height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        # Flux returns packed 2x2 patches (B, tokens, 4C); the VAE wants (B, C, h, w).
        default = pipeline.default_sample_size * pipeline.vae_scale_factor
        return pipeline._unpack_latents(latents, height or default, width or default, pipeline.vae_scale_factor)

    def guidance_rows(self, guidance_scale: float) -> int:
        return 1  # guidance is an input of the transformer (dev) or ignored (schnell): no negative rows

    def image_size_rule(self, vae_config: dict | None, denoiser_config: dict) -> ImageSizeRule:
        """Multiples of twice the VAE factor: FluxPipeline packs 2x2 latent patches, and rounds other sizes down
        with only a warning (the image would not have the size asked for). Rotary positions have no limit."""
        vae = vae_scale_factor(vae_config)
        return ImageSizeRule(vae * 2, f"VAE factor {vae} x 2 for the packed 2x2 latent patches")

    def encode_prompts(self, pipeline, prompts: list[str], guidance_scale: float,
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """T5 sequence embeddings and the pooled CLIP embedding.

        Flux-dev embeds the guidance scale in the transformer (`guidance_embeds`) and Flux-schnell ignores
        it: there is no classifier-free guidance and so no negative embeddings, whatever `guidance_scale`.
        """
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            emb, pooled, _text_ids = pipeline.encode_prompt(prompt=prompts, prompt_2=None, **extra)
        return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}




def build_flux_pipeline(
    words: list[str],
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_heads: int = 2,
    head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int] | None = None,
    sample_size: int = 8,
    latent_channels: int = 16,
    image_channels: int = 3,
    vae_channels: tuple[int, ...] = (8, 16),
    guidance_embeds: bool = False,
    max_sequence_length: int = 16,
    text=None,
    seed: int = 0,
    transformer=None,
    vae_config: dict | None = None,
):
    """A complete `FluxPipeline` built from configs with random weights (no network).

    `sample_size` is the (unpacked, even) latent size; images are `sample_size * 2 ** (len(vae_channels) - 1)`
    pixels. The pipeline object's `default_sample_size` is set so that a call without height/width uses
    that size (FluxPipeline otherwise defaults to 128 latent pixels whatever the model); it is not saved
    by `save_pretrained`. The transformer packs 2x2 latent patches: `in_channels = 4 * latent_channels`.
    `sum(axes_dims_rope)` must equal `head_dim`; by default the three rotary axes split it
    about evenly, each an even width.
    The T5 tokenizer's `model_max_length` is `max_sequence_length`: pass that value when encoding
    (FluxPipeline pads T5 to 512 tokens otherwise). CLIP's width sets `pooled_projection_dim` and T5's
    width `joint_attention_dim` (`text`: a `TextStackConfig`; only the first CLIP width is used).
    `transformer`: a ready denoiser used instead of building one (its widths must match `text` and
    `latent_channels`); `vae_config`: extra VAE config (e.g. the real scaling/shift factors).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from obsdiff.models.components import tiny_vae
    from obsdiff.models.text import TextStackConfig, clip_text_encoder, clip_tokenizer, t5_text_encoder, t5_tokenizer

    text = text or TextStackConfig()
    if axes_dims_rope is None:
        k = 2 * (head_dim // 6)
        axes_dims_rope = (head_dim - 2 * k, k, k)
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"sum(axes_dims_rope) = {sum(axes_dims_rope)} must equal head_dim = {head_dim}")
    tokenizer = clip_tokenizer(words, text.max_length)
    tokenizer_2 = t5_tokenizer(words, max_sequence_length)
    text_encoder = clip_text_encoder(len(tokenizer), text.clip_hidden[0], text.clip_hidden[0], text, seed + 1,
                                     with_projection=False)
    text_encoder_2 = t5_text_encoder(len(tokenizer_2), text, seed + 3)
    torch.manual_seed(seed)
    transformer = transformer or FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=text.t5_d_model,
        pooled_projection_dim=text.clip_hidden[0],
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    )
    vae = tiny_vae(image_channels, latent_channels, vae_channels, sample_size,
                   **({"shift_factor": 0.0, "use_quant_conv": False, "use_post_quant_conv": False}
                      | (vae_config or {})))
    # Flux's own scheduler config: the shift follows the image token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.default_sample_size = sample_size  # height = default_sample_size * vae_scale_factor
    return pipe
