"""SD3 / SD3.5 family: `StableDiffusion3Pipeline` with an MMDiT `SD3Transformer2DModel`.

Each `JointTransformerBlock` has an image stream (`attn.to_*`, `ff`) and a text stream
(`attn.add_*`, `ff_context`) that share one joint attention. The last block of SD3 is
`context_pre_only`: it has no `to_add_out` and no `ff_context`. SD3.5 "dual" blocks add a second,
image-only attention `attn2` fed by its own adaLN output. adaLN linears (`norm1.linear`,
`norm1_context.linear`), embedders and the final projection are never pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from obsdiff.models import mmdit
from obsdiff.models.registry import (
    DEMO_GUIDANCE,
    Block,
    ImageSizeRule,
    ModelFamily,
    OnnxInput,
    OnnxIO,
    OnnxProfile,
    StructureGroup,
    demo_profile,
    embedding_kwargs,
    present_groups,
    range_dim,
    register_family,
    vae_scale_factor,
)


def _position_limit(cfg) -> int | None:
    """The largest latent height/width the cropped sin-cos position table covers (None: computed on the fly)."""
    return cfg.pos_embed_max_size * cfg.patch_size if cfg.pos_embed_max_size else None


def _release(cfg) -> str:
    """The released model a denoiser config is: SD3.5 added qk_norm (RMSNorm on q and k), SD3.5-Medium also
    the dual-attention blocks (MMDiT-X)."""
    if not getattr(cfg, "qk_norm", None):
        return "SD3-Medium"
    return "SD3.5-Medium" if getattr(cfg, "dual_attention_layers", None) else "SD3.5-Large"


@register_family
class SD3Family(ModelFamily):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (MMDiT)"
    denoiser_classes = ("SD3Transformer2DModel",)
    denoiser_attr = "transformer"

    def blocks(self, denoiser: nn.Module) -> list[Block]:
        return [
            Block(i, f"transformer_blocks.{i}", blk) for i, blk in enumerate(denoiser.transformer_blocks)
        ]

    def next_block_inputs(self, output, inputs: dict) -> dict:
        return mmdit.next_block_inputs(output, inputs)

    def shared_input_groups(self, block: Block) -> list[tuple[str, ...]]:
        return present_groups(block, mmdit.INPUT_GROUPS)

    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int = 1,
        height: int | None = None,
        width: int | None = None,
        text_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg = denoiser.config
        param = next(denoiser.parameters())
        h = height or cfg.sample_size
        w = width or cfg.sample_size
        # SD3 uses 77 CLIP tokens + max_sequence_length T5 tokens; small models pass their own length.
        n_text = text_len or 77 + 256

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(param.device, param.dtype)

        return {
            "hidden_states": randn(batch, cfg.in_channels, h, w),
            "encoder_hidden_states": randn(batch, n_text, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
            "timestep": (torch.rand(batch, generator=generator) * 1000).to(param.device, param.dtype),
        }

    def text_len(self, pipeline, max_sequence_length: int | None = None) -> int | None:
        clip = pipeline.tokenizer.model_max_length if getattr(pipeline, "tokenizer", None) is not None else 77
        return clip + (max_sequence_length or 256)  # CLIP tokens, then T5 tokens

    def image_size_rule(self, vae_config: dict | None, denoiser_config: dict) -> ImageSizeRule:
        """Multiples of VAE factor x patch size (StableDiffusion3Pipeline.check_inputs), at most as many patches
        as the cropped position table holds (PatchEmbed.cropped_pos_embed); defaults are the model class's."""
        vae = vae_scale_factor(vae_config)
        patch = denoiser_config.get("patch_size", 2)
        table = denoiser_config.get("pos_embed_max_size", 96)
        return ImageSizeRule(vae * patch, f"VAE factor {vae} x patch size {patch}",
                             limit=table * patch * vae if table else None,
                             limit_why=f"its position table covers {table} patches a side")

    def structure_groups(self, block: Block) -> list[StructureGroup]:
        return mmdit.structure_groups(block)

    def onnx_dtype(self, denoiser: nn.Module) -> tuple[str, str]:
        """fp16 for SD3-Medium, which the TensorRT diffusion demo always builds in fp16; bf16 for SD3.5, which the
        demo's documented commands build with --bf16 (its published SD3.5 ONNX files are bf16 or fp8)."""
        release = _release(denoiser.config)
        if release == "SD3-Medium":
            return "fp16", "TensorRT diffusion demo default for SD3-Medium (it builds the MMDiT in fp16)"
        return "bf16", (f"TensorRT diffusion demo precision for {release}: its commands pass --bf16 and its "
                        "published SD3.5 ONNX files are bf16 (it builds fp16 only without that flag)")

    def onnx_profile(self, pipeline, max_sequence_length: int | None = None,
                     guidance_scale: float | None = None) -> OnnxProfile:
        """The demo's batch and image ranges within the position table; text fixed at the pipeline's CLIP + T5
        tokens (77 + 256 by default, the demo's SD3.5 text length)."""
        cfg = self.denoiser(pipeline).config
        release = _release(cfg)
        n = self.text_len(pipeline, max_sequence_length)
        note = (f"fixed at the pipeline's {n} tokens (CLIP, then T5); the demo's own SD3-Medium MMDiT takes 154 "
                "(T5 padded to 77)") if release == "SD3-Medium" else None
        rows = self.guidance_rows(DEMO_GUIDANCE if guidance_scale is None else guidance_scale)
        return demo_profile(release, rows, (n, n, n), cfg.sample_size, cfg.patch_size, _position_limit(cfg),
                            f"the position table covers {cfg.pos_embed_max_size} patches of {cfg.patch_size}", note)

    def onnx_io(self, denoiser: nn.Module, ranges: dict[str, tuple[int, int, int]]) -> OnnxIO:
        """TensorRT demo names: hidden_states, encoder_hidden_states, pooled_projections, timestep -> latent.

        Latent height/width must be multiples of the patch size and fit the cropped position table.
        """
        cfg = denoiser.config
        b = range_dim("batch", ranges["batch"])
        h = range_dim("height", ranges["height"], cfg.patch_size, _position_limit(cfg))
        w = range_dim("width", ranges["width"], cfg.patch_size, _position_limit(cfg))
        t = range_dim("text", ranges["text"], what="--text-len")
        return OnnxIO((
            OnnxInput("hidden_states", "hidden_states", (b, cfg.in_channels, h, w)),
            OnnxInput("encoder_hidden_states", "encoder_hidden_states", (b, t, cfg.joint_attention_dim)),
            OnnxInput("pooled_projections", "pooled_projections", (b, cfg.pooled_projection_dim)),
            OnnxInput("timestep", "timestep", (b,), "float32"),
        ), ranges=(b, h, w, t))

    def encode_prompts(self, pipeline, prompts: list[str], guidance_scale: float,
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        cfg = guidance_scale > 1.0
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad():
            emb, neg, pooled, neg_pooled = pipeline.encode_prompt(
                prompts, None, None, do_classifier_free_guidance=cfg, **extra)
        return embedding_kwargs(emb, pooled, neg, neg_pooled, cfg)


def build_sd3_pipeline(
    words: list[str],
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 8,
    sample_size: int = 8,
    latent_channels: int = 4,
    image_channels: int = 3,
    vae_channels: tuple[int, ...] = (8, 16),
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    text=None,
    shift: float = 3.0,
    seed: int = 0,
    transformer=None,
    vae_config: dict | None = None,
):
    """A complete `StableDiffusion3Pipeline` built from configs with random weights (no network).

    Used for the tests' tiny models and as the starting point of the embedded digits model.
    `sample_size` is the latent size; images are `sample_size * 2 ** (len(vae_channels) - 1)` pixels.
    `transformer`: a ready denoiser used instead of building one (its widths must match `text` and
    `latent_channels`); `vae_config`: extra VAE config (e.g. the real scaling/shift factors).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from obsdiff.models.components import tiny_vae
    from obsdiff.models.text import TextStackConfig, build_text_stack

    text = text or TextStackConfig()
    stack = build_text_stack(words, text, seed=seed)
    torch.manual_seed(seed)
    inner = num_heads * head_dim
    transformer = transformer or SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=text.joint_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=text.pooled_dim,
        out_channels=latent_channels,
        pos_embed_max_size=max(16, sample_size),
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    vae = tiny_vae(image_channels, latent_channels, vae_channels, sample_size,
                   **({"shift_factor": 0.0} | (vae_config or {})))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, **stack)
