"""The model-family registry: everything obsdiff knows about a denoiser architecture is reached here.

A family adapter answers a few questions about a pipeline (which module is the denoiser, which blocks
it has, which linears of a block may be pruned, which of them read the same input tensor, how to build
example inputs for export). The pruning core asks these questions and never names an architecture.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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


def default_range(opt: int, multiple: int = 1, limit: int | None = None) -> tuple[int, int, int]:
    """Half to twice `opt`, on multiples of `multiple`, capped by `limit`: the default export profile."""
    lo = max(multiple, (opt // 2) // multiple * multiple)
    hi = 2 * opt if limit is None else max(opt, min(2 * opt, limit // multiple * multiple))
    return lo, opt, hi


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

    def onnx_default_ranges(self, pipeline, max_sequence_length: int | None = None) -> dict[str, tuple[int, int, int]]:
        """Default (min, opt, max) of `height`, `width` (latent pixels) and `text` (tokens) for export.

        `max_sequence_length`: the T5 length the pipeline is used with (None: the family's default).
        """
        raise UnsupportedModelError(f"the {self.name} family has no ONNX export description")

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
