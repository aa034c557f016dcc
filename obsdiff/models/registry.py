"""The model-family registry: everything obsdiff knows about a denoiser architecture is reached here.

A family adapter answers a few questions about a pipeline (which module is the denoiser, which blocks
it has, which linears of a block may be pruned, which of them read the same input tensor, how to build
example inputs for export). The pruning core asks these questions and never names an architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from obsdiff.errors import UnsupportedModelError

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


class ModelFamily(ABC):
    """Adapter for one denoiser architecture. Subclasses are registered with `@register_family`."""

    name: str = ""
    description: str = ""
    pipeline_classes: tuple[str, ...] = ()
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

    @abstractmethod
    def prunable_linears(self, block: Block) -> dict[str, nn.Linear]:
        """Linears of the block that may be pruned, in forward order, by dotted name in the denoiser."""

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

    def text_len(self, pipeline, max_sequence_length: int | None = None) -> int | None:
        """Text tokens the denoiser sees per image at generation time (None: `example_inputs` default)."""
        return None

    def structure_groups(self, block: Block) -> list[StructureGroup]:
        """Heads and FFN neurons of the block that can be removed physically (structured pruning).

        Families without structure knowledge return [] and structured pruning refuses them.
        """
        return []

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
