"""The model-family registry: everything obsdiff knows about a denoiser architecture is reached here.

A family adapter answers a few questions about a pipeline (which module is the denoiser, which blocks
it has, which linears of a block may be pruned, which of them read the same input tensor, how to build
example inputs for export). The pruning core asks these questions and never names an architecture.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from obsdiff.errors import ConfigError, UnsupportedModelError

FAMILIES: dict[str, ModelFamily] = {}


@dataclass(frozen=True)
class Block:
    """One repeated unit of the denoiser, addressed by its dotted name inside the denoiser."""

    index: int
    name: str
    module: nn.Module


@dataclass(frozen=True)
class Slice:
    """Where structure 0 of a group starts inside one linear (rows or columns, see `StructureGroup`)."""

    linear: str  # dotted name in the denoiser
    offset: int = 0


@dataclass(frozen=True)
class StructureGroup:
    """A set of removable structures of one kind in a block: the heads of an attention, or FFN neurons.

    Structure i owns, in every `readers` linear, the input columns
    `[offset + i * size, offset + (i + 1) * size)` (the side OBS scores and compensates: attention output
    projections, FFN down projections), and in every `writers` linear the same range of output rows and
    bias entries (q/k/v projections, FFN up projections; GEGLU lists its up projection twice, at offsets 0
    and inner). Removing structure i deletes all of those rows and columns. `attention` names the
    attention module whose `heads` / `inner_dim` must follow the number of kept heads.
    Offsets are in the dense layout: shrinking applies all groups of a linear at once.
    """

    kind: str  # "heads" or "ffn"
    name: str  # unique within the denoiser, e.g. "transformer_blocks.3.attn"
    count: int  # structures in the dense model
    size: int  # rows/columns per structure: head_dim for heads, 1 for neurons
    readers: tuple[Slice, ...]
    writers: tuple[Slice, ...]
    attention: str | None = None


@dataclass(frozen=True)
class OnnxDim:
    """A dynamic dimension of an exported graph with its TensorRT optimization profile.

    Every value in [min, max] that is a multiple of `multiple` is valid; `opt` is the shape the engine is
    tuned for. Inputs that share a dimension share the same `OnnxDim` (same name).
    """

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    @property
    def static(self) -> bool:
        return self.min == self.max

    def values(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max


@dataclass(frozen=True)
class OnnxInput:
    """One input of the exported graph and the forward keyword argument it feeds.

    `kwarg` is a keyword of the denoiser's forward (dotted for nested dicts, e.g.
    `added_cond_kwargs.time_ids`); `dtype` is "model" (the exported precision) or a fixed torch dtype
    name ("float32" for timesteps and position ids, which lose too much in half precision).
    """

    name: str
    kwarg: str
    shape: tuple[OnnxDim | int, ...]
    dtype: str = "model"


@dataclass(frozen=True)
class OnnxIO:
    """The denoiser's ONNX signature: inputs in graph order and the output name(s).

    `ranges` are the user-level dimensions (batch, height, width, text) that `example_inputs` takes:
    inputs are made at points of these ranges (the graph's own dims may be derived from them, like
    Flux's packed image tokens).
    """

    inputs: tuple[OnnxInput, ...]
    outputs: tuple[str, ...] = ("latent",)
    ranges: tuple[OnnxDim, ...] = ()

    def dims(self) -> dict[str, OnnxDim]:
        return {d.name: d for i in self.inputs for d in i.shape if isinstance(d, OnnxDim)}


def range_dim(name: str, values: tuple[int, int, int], multiple: int = 1, limit: int | None = None,
              what: str = "") -> OnnxDim:
    """An `OnnxDim` from a user's MIN:OPT:MAX, checked against the model's constraints (one-line errors)."""
    lo, opt, hi = values
    flag = what or f"--{name.replace('_', '-')}"
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"{flag} {lo}:{opt}:{hi} must satisfy 1 <= MIN <= OPT <= MAX")
    bad = [v for v in values if v % multiple]
    if bad:
        raise ConfigError(f"{flag} {lo}:{opt}:{hi}: {bad[0]} is not a multiple of {multiple}, which this model needs")
    if limit is not None and hi > limit:
        raise ConfigError(f"{flag} {lo}:{opt}:{hi}: MAX {hi} exceeds this model's limit of {limit}")
    return OnnxDim(name, lo, opt, hi, multiple)


# The engines of TensorRT's diffusion demo (github.com/NVIDIA/TensorRT, demo/Diffusion): 1 to 4 images per
# prompt tuned for 1 (its pipelines' MAX_BATCH_SIZE and --batch-size default), images of 256 to 1360 pixels a
# side with --build-dynamic-shape (BaseModel.min_image_shape / max_image_shape) tuned for the 1024 of its
# txt2img demos, latents of image / 8 (BaseModel.compression_factor). Its guidance scales are all above 1
# (SD3 5, SD3.5 7, SDXL 5), so families with classifier-free guidance get two denoiser rows per image.
DEMO_IMAGES = (1, 1, 4)
DEMO_IMAGE_PIXELS = (256, 1024, 1360)
DEMO_LATENT_FACTOR = 8
DEMO_GUIDANCE = 5.0


def format_range(values: tuple[int, int, int]) -> str:
    return ":".join(map(str, values))


@dataclass(frozen=True)
class OnnxProfile:
    """A default TensorRT optimization profile for export: (min, opt, max) per range, and why.

    `batch` counts denoiser rows (classifier-free guidance doubles the images), `images` what the VAE decoder
    and the text encoders see; `height`/`width` are latent pixels, `text` denoiser text tokens. `source` says
    where the numbers come from; `notes` ({range: text}) where this model narrowed them.
    """

    batch: tuple[int, int, int]
    images: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    text: tuple[int, int, int]
    source: str
    notes: dict[str, str] = field(default_factory=dict)

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        return {"batch": self.batch, "images": self.images, "height": self.height, "width": self.width,
                "text": self.text}


def fit_range(values: tuple[int, int, int], multiple: int = 1, limit: int | None = None,
              limit_why: str = "") -> tuple[tuple[int, int, int], str | None]:
    """`values` narrowed to multiples of `multiple` no larger than `limit`, and a note when that changed them."""
    lo, opt, hi = values
    top = max(multiple, (hi if limit is None else min(hi, limit)) // multiple * multiple)
    low = min(-(-lo // multiple) * multiple, top)
    fitted = (low, min(max(low, opt // multiple * multiple), top), top)
    if fitted == tuple(values):
        return fitted, None
    why = [f"multiples of {multiple}"] if any(v % multiple for v in values) else []
    if limit is not None and hi > limit:
        why.append(f"at most {limit}" + (f", {limit_why}" if limit_why else ""))
    return fitted, f"{format_range(values)} narrowed to {format_range(fitted)} ({'; '.join(why)})"


def demo_profile(model: str, rows: int, text: tuple[int, int, int], native: int | None = None, multiple: int = 1,
                 limit: int | None = None, limit_why: str = "", text_note: str | None = None) -> OnnxProfile:
    """The TensorRT diffusion demo's profile for `model`: `rows` denoiser rows per image (2 with classifier-free
    guidance), `text` tokens as the family sets them, latent sizes tuned for `native` (the model's default size;
    the demo's 1024 px images are every demo model's default) and widened to include it, then narrowed to
    multiples of `multiple` up to `limit`."""
    lo, opt, hi = (p // DEMO_LATENT_FACTOR for p in DEMO_IMAGE_PIXELS)
    changes = []
    if native and native != opt:
        changes.append(f"tuned for the model's default {native} (the demo's is {opt})")
        lo, opt, hi = min(lo, native), native, max(hi, native)
    latent, note = fit_range((lo, opt, hi), multiple, limit, limit_why)
    changes += [note] if note else []
    notes = dict.fromkeys(("height", "width"), "latent " + "; ".join(changes)) if changes else {}
    if text_note:
        notes["text"] = text_note
    px_lo, px_opt, px_hi = DEMO_IMAGE_PIXELS
    guidance = f", x{rows} denoiser rows for classifier-free guidance" if rows > 1 else ""
    source = (f"TensorRT diffusion demo default for {model}: {DEMO_IMAGES[0]} to {DEMO_IMAGES[2]} images tuned for "
              f"{DEMO_IMAGES[1]}{guidance}; images {px_lo} to {px_hi} px a side tuned for {px_opt} (its "
              f"--build-dynamic-shape range), latent = image / {DEMO_LATENT_FACTOR}")
    return OnnxProfile(tuple(rows * b for b in DEMO_IMAGES), DEMO_IMAGES, latent, latent, text, source, notes)


def vae_scale_factor(vae_config: dict | None) -> int:
    """Image pixels per latent pixel, as diffusers' pipelines compute it: 2 ** (VAE levels - 1); 8 without a VAE.

    A missing `block_out_channels` is AutoencoderKL's default, one level.
    """
    if vae_config is None:
        return 8
    return 2 ** (len(vae_config.get("block_out_channels") or (64,)) - 1)


@dataclass(frozen=True)
class ImageSizeRule:
    """The image heights and widths (pixels) a pipeline accepts: multiples of `multiple`, at most `limit`.

    `why` and `limit_why` say where the numbers come from, for the error message.
    """

    multiple: int
    why: str
    limit: int | None = None
    limit_why: str = ""

    @property
    def largest(self) -> int | None:
        """The largest valid size (None: no limit)."""
        return None if self.limit is None else max(self.multiple, self.limit // self.multiple * self.multiple)

    def nearest(self, value: int) -> list[int]:
        """The valid sizes closest to `value`: the multiples just below and above it, within the limit."""
        if self.largest is not None and value > self.largest:
            return [self.largest]
        below = value // self.multiple * self.multiple
        return [v for v in (below, below + self.multiple)
                if v >= self.multiple and (self.largest is None or v <= self.largest)]


def check_image_size(rule: ImageSizeRule, sizes: dict[str, int | None], model: str) -> None:
    """Refuse a size (`{flag: pixels or None}`) that `rule` does not allow, in one line naming the nearest valid
    ones; None is the model's default and always valid."""
    for flag, value in sizes.items():
        if value is None:
            continue
        if rule.largest is not None and value > rule.largest:
            raise ConfigError(f"{flag} {value} is larger than {rule.largest}, the largest size {model} takes "
                              f"({rule.limit_why}); use {rule.largest} or less, a multiple of {rule.multiple}")
        if value % rule.multiple:
            raise ConfigError(f"{flag} {value} is not a multiple of {rule.multiple}, which {model} needs ({rule.why}); "
                              f"use {' or '.join(map(str, rule.nearest(value)))}")


class ModelFamily(ABC):
    """Adapter for one denoiser architecture. Subclasses are registered with `@register_family`."""

    name: str = ""
    description: str = ""
    denoiser_classes: tuple[str, ...] = ()
    denoiser_attr: str = "transformer"

    def matches(self, pipeline) -> bool:
        denoiser = getattr(pipeline, self.denoiser_attr, None)
        return denoiser is not None and type(denoiser).__name__ in self.denoiser_classes

    def denoiser(self, pipeline) -> nn.Module:
        return getattr(pipeline, self.denoiser_attr)

    @abstractmethod
    def blocks(self, denoiser: nn.Module) -> list[Block]:
        """The prunable blocks in forward order."""

    def prunable_linears(self, block: Block) -> dict[str, nn.Linear]:
        """Linears of the block that may be pruned, in forward order, by dotted name in the denoiser."""
        modules = dict(block.module.named_modules())
        prefix = len(block.name) + 1
        return {n: modules[n[prefix:]] for g in self.shared_input_groups(block) for n in g}

    @abstractmethod
    def shared_input_groups(self, block: Block) -> list[tuple[str, ...]]:
        """Sets of prunable linears (dotted names) that read the same input tensor: one Hessian each."""

    @abstractmethod
    def example_inputs(
        self,
        denoiser: nn.Module,
        batch: int = 1,
        height: int | None = None,
        width: int | None = None,
        text_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for one denoiser forward, with random values of the right shapes.

        `height`/`width` are in latent pixels; defaults come from the denoiser's config.
        """

    @abstractmethod
    def encode_prompts(self, pipeline, prompts: list[str], guidance_scale: float,
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Encode prompts once; returns the embedding keyword arguments of the pipeline call.

        Calibration calls the pipeline with these instead of text, so text encoders run once per prompt
        rather than once per pass. With guidance > 1 the negative (empty-prompt) embeddings are included.
        """

    def latents_for_vae(self, pipeline, latents: torch.Tensor, height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result in the VAE's (B, C, h, w) layout (before scaling).

        `height`/`width` are the generated image's pixels (None: the pipeline's default).
        """
        return latents

    def text_len(self, pipeline, max_sequence_length: int | None = None) -> int | None:
        """Text tokens the denoiser sees per image at generation time (None: `example_inputs` default)."""
        return None

    def guidance_rows(self, guidance_scale: float) -> int:
        """Denoiser batch rows per prompt at this guidance: 2 with classifier-free guidance, else 1."""
        return 2 if guidance_scale > 1.0 else 1

    def image_size_rule(self, vae_config: dict | None, denoiser_config: dict) -> ImageSizeRule:
        """The image sizes the family's pipeline accepts, from the VAE's and the denoiser's config files.

        By default multiples of the VAE factor: the latent is the image divided by it, so any other size would
        come back from the decoder as a different one. Families add what their pipeline and denoiser need.
        """
        vae = vae_scale_factor(vae_config)
        return ImageSizeRule(vae, f"the VAE's factor {vae}")

    def next_block_inputs(self, output, inputs: dict) -> dict:
        """The keyword inputs of the next block, from one block's `output` and its keyword `inputs`.

        Only families whose denoiser is a plain chain of blocks (each block's output is the next one's input,
        nothing computed in between) implement it; they support calibration on cached block inputs.
        """
        raise NotImplementedError(f"the {self.name} denoiser is not a plain chain of blocks")

    @property
    def chains_blocks(self) -> bool:
        """Whether the family implements `next_block_inputs` (cached calibration is possible)."""
        return type(self).next_block_inputs is not ModelFamily.next_block_inputs

    def structure_groups(self, block: Block) -> list[StructureGroup]:
        """Heads and FFN neurons of the block that can be removed physically (structured pruning).

        Families without structure knowledge return [] and structured pruning refuses them.
        """
        return []

    def onnx_dtype(self, denoiser: nn.Module) -> tuple[str, str]:
        """The precision the denoiser is exported in by default, and why: the one TensorRT's diffusion demo builds
        this model in. fp32 (exact) for a family without a known deployment precision."""
        return "fp32", f"no deployment precision known for the {self.name} family, so exact fp32"

    def onnx_profile(self, pipeline, max_sequence_length: int | None = None,
                     guidance_scale: float | None = None) -> OnnxProfile:
        """The default TensorRT optimization profile of an export (`OnnxProfile`): the TensorRT diffusion demo's
        ranges for this model, narrowed to what it supports.

        `max_sequence_length`: the T5 length the pipeline is used with (None: the family's default);
        `guidance_scale`: the one it generates with (None: the demo's, with classifier-free guidance).
        """
        raise UnsupportedModelError(f"the {self.name} family has no ONNX export description")

    def onnx_default_ranges(self, pipeline, max_sequence_length: int | None = None) -> dict[str, tuple[int, int, int]]:
        """Default (min, opt, max) of `batch`, `images`, `height`, `width` (latent pixels) and `text` (tokens)."""
        return self.onnx_profile(pipeline, max_sequence_length).ranges()

    def onnx_io(self, denoiser: nn.Module, ranges: dict[str, tuple[int, int, int]]) -> OnnxIO:
        """The denoiser's ONNX inputs/outputs (TensorRT demo names) for `ranges` of batch, height, width, text.

        Values are checked against the model's constraints (patch multiples, position table size).
        """
        raise UnsupportedModelError(f"the {self.name} family has no ONNX export description")

    def onnx_export_context(self, denoiser: nn.Module) -> contextlib.AbstractContextManager:
        """Temporary changes that make the denoiser's graph exportable (e.g. no float64); none by default."""
        return contextlib.nullcontext()

    def onnx_text_encoders(self, pipeline) -> list[tuple[str, str]]:
        """(text encoder, tokenizer) attribute names of the pipeline's encoders that are present."""
        pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
        return [(e, t) for e, t in pairs if getattr(pipeline, e, None) is not None]

    def summary(self, denoiser: nn.Module) -> dict:
        blocks = self.blocks(denoiser)
        n_linear = sum(len(self.prunable_linears(b)) for b in blocks)
        n_params = sum(p.numel() for p in denoiser.parameters())
        prunable = sum(m.weight.numel() for b in blocks for m in self.prunable_linears(b).values())
        return {
            "family": self.name,
            "denoiser": type(denoiser).__name__,
            "blocks": len(blocks),
            "prunable_linears": n_linear,
            "parameters": n_params,
            "prunable_parameters": prunable,
        }


def embedding_kwargs(emb, pooled, neg, neg_pooled, cfg: bool) -> dict:
    """The pipeline-call keywords for encoded prompts; the negatives only with classifier-free guidance."""
    out = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
    if cfg:
        out |= {"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}
    return out


def present_groups(block: Block, groups: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The listed shared-input groups (names relative to the block) that exist in this block, as dotted names."""
    modules = dict(block.module.named_modules())
    out = []
    for group in groups:
        names = tuple(f"{block.name}.{n}" for n in group if isinstance(modules.get(n), nn.Linear))
        if names:
            out.append(names)
    return out


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    FAMILIES[cls.name] = cls()
    return cls


def supported_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.denoiser_classes)})" for f in FAMILIES.values())


def family_for_pipeline(pipeline) -> ModelFamily:
    """The family adapter for a loaded diffusers pipeline, or an error listing the supported ones."""
    for family in FAMILIES.values():
        if family.matches(pipeline):
            return family
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    what = type(pipeline).__name__ + (f" with {type(denoiser).__name__}" if denoiser is not None else "")
    raise UnsupportedModelError(f"unsupported pipeline {what}; supported families: {supported_families()}")


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; supported families: {supported_families()}"
        ) from None
