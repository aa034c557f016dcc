"""What gets exported: one `Component` per graph, with its signature, inputs and precision policy.

The denoiser's signature comes from its family adapter (`ModelFamily.onnx_io`); the VAE decoder
(`vae.decode`) and the text encoders (CLIP, T5, by class) are the same for every family.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from obsdiff import devices
from obsdiff.errors import ConfigError
from obsdiff.models.registry import OnnxDim, OnnxInput, OnnxIO, range_dim


class Positional(nn.Module):
    """Calls `model` with keyword arguments built from the graph's positional inputs.

    `kwargs[i]` is the (dotted, for nested dicts) keyword that input i feeds; `call(model, kwargs)` runs
    the forward and returns the output tensor(s).
    """

    def __init__(self, model: nn.Module, kwargs: list[str], call: Callable):
        super().__init__()
        self.model = model
        self.kwargs = list(kwargs)
        self.call = call

    def forward(self, *args):
        kwargs: dict = {}
        for path, value in zip(self.kwargs, args, strict=True):
            *parents, leaf = path.split(".")
            node = kwargs
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return self.call(self.model, kwargs)


@dataclass
class Component:
    """One graph to export: the module, its signature, how to make inputs, and what the sidecar says."""

    name: str  # file stem: transformer, unet, vae_decoder, text_encoder, ...
    kind: str  # transformer, vae-decoder or text-encoders (the --component it belongs to)
    module: nn.Module
    io: OnnxIO
    call: Callable
    make_kwargs: Callable[[dict, torch.Generator], dict]
    dtype: str
    notes: list[str] = field(default_factory=list)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    info: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return devices.torch_dtype(self.dtype)

    def wrapper(self) -> Positional:
        return Positional(self.module, [i.kwarg for i in self.io.inputs], self.call).eval()

    def inputs_at(self, point: dict[str, int], seed: int) -> tuple[torch.Tensor, ...]:
        kwargs = self.make_kwargs(point, torch.Generator().manual_seed(seed))
        out = []
        for inp in self.io.inputs:
            value = kwargs
            for key in inp.kwarg.split("."):
                value = value[key]
            dtype = self.torch_dtype if inp.dtype == "model" else getattr(torch, inp.dtype)
            out.append(value.to(dtype))
        return tuple(out)


def _denoiser_call(model, kwargs):
    return model(**kwargs, return_dict=False)[0]


def _vae_decode_call(model, kwargs):
    return model.decode(kwargs["latent"], return_dict=False)[0]


def _clip_call(model, kwargs):
    out = model(input_ids=kwargs["input_ids"], output_hidden_states=True, return_dict=True)
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return out.last_hidden_state, out.hidden_states[-2], pooled


def _t5_call(model, kwargs):
    return model(input_ids=kwargs["input_ids"], return_dict=True).last_hidden_state


# Text encoder classes: (call, output names). CLIP gives the last and penultimate hidden states (SD3 and
# SDXL feed the penultimate to the denoiser) and the pooled (projected, when the class projects) output.
TEXT_ENCODERS = {
    "CLIPTextModel": (_clip_call, ("text_embeddings", "hidden_states", "pooled_output")),
    "CLIPTextModelWithProjection": (_clip_call, ("text_embeddings", "hidden_states", "pooled_output")),
    "T5EncoderModel": (_t5_call, ("text_embeddings",)),
}
MAX_TEXT_TOKENS = 512  # tokenizers without a real limit report ~1e30


def _cast(module: nn.Module, dtype: torch.dtype, owned: bool) -> tuple[nn.Module, list[str]]:
    """`module` in `dtype`, keeping the submodules its class marks `_keep_in_fp32_modules` in fp32.

    A module the caller still owns is copied first, so the caller's weights keep their precision.
    """
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    current = {p.dtype for p in module.parameters()}
    if current == {dtype} and not (keep and dtype != torch.float32):
        return module.eval(), []
    from obsdiff.runs.loading import quiet_libraries

    if not owned:
        module = copy.deepcopy(module)
    with quiet_libraries():
        module.to(dtype)
    kept = []
    if keep and dtype != torch.float32:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                sub.to(torch.float32)
                kept.append(name)
    return module.eval(), kept


def resolve_ranges(loaded, cfg) -> tuple[dict[str, tuple[int, int, int]], dict]:
    """The export's ranges {batch (denoiser rows), images (VAE and text encoder batch), height, width, text}:
    the config's, else the model's defaults (`ModelFamily.onnx_profile`: TensorRT's diffusion demo), and the
    record of where they come from: {"ranges", "given" (the ones the config set), "source", "notes"}."""
    gen = loaded.generation_defaults
    profile = loaded.family.onnx_profile(loaded.pipeline, gen.get("max_sequence_length"), gen.get("guidance_scale"))
    given = {"batch": cfg.batch, "images": cfg.batch, "height": cfg.height, "width": cfg.width, "text": cfg.text_len}
    ranges = {k: given[k] or v for k, v in profile.ranges().items()}
    defaulted = [k for k in ranges if given[k] is None]
    record = {"ranges": {k: list(v) for k, v in ranges.items()}, "given": [k for k in ranges if given[k]],
              "source": profile.source if defaulted else "given", "notes": {k: profile.notes[k] for k in defaulted
                                                                           if k in profile.notes}}
    return ranges, record


def range_keys(comp: Component) -> dict[str, str]:
    """{range name in `comp`'s graph: key in `resolve_ranges`' ranges}: a graph's batch is `images` unless it is
    the denoiser's."""
    return {d.name: "images" if d.name == "batch" and comp.kind != "transformer" else d.name for d in comp.io.ranges}


def select_profile(record: dict, keys: dict[str, str]) -> dict:
    """The part of `resolve_ranges`' record for `keys` ({name: key}, see `range_keys`), keyed by name."""
    given = [name for name, key in keys.items() if key in record["given"]]
    return {"ranges": {name: record["ranges"][key] for name, key in keys.items()}, "given": given,
            "source": record["source"] if len(given) < len(keys) else "given",
            "notes": {name: record["notes"][key] for name, key in keys.items() if key in record["notes"]}}


def _denoiser_component(loaded, cfg, ranges: dict, owned: bool) -> Component:
    family = loaded.family
    dtype, _ = cfg.dtype_for("transformer")
    module, kept = _cast(family.denoiser(loaded.pipeline), devices.torch_dtype(dtype), owned)
    io_spec = family.onnx_io(module, ranges)

    def make_kwargs(point, generator):
        return family.example_inputs(module, batch=point["batch"], height=point["height"], width=point["width"],
                                     text_len=point["text"], generator=generator)

    notes = [f"kept in fp32: {', '.join(kept)} (the class marks them _keep_in_fp32_modules)"] if kept else []
    fixed = [i.name for i in io_spec.inputs if i.dtype != "model"]
    if fixed and dtype != "fp32":
        notes.append(f"inputs {', '.join(fixed)} stay float32 (timesteps and positions lose too much in {dtype})")
    return Component(family.denoiser_attr, "transformer", module, io_spec, _denoiser_call, make_kwargs, dtype,
                     notes, context=lambda: family.onnx_export_context(module),
                     info={"class": type(module).__name__, "family": family.name,
                           "parameters": sum(p.numel() for p in module.parameters())})


def _vae_component(loaded, cfg, ranges: dict, owned: bool) -> Component:
    vae = getattr(loaded.pipeline, "vae", None)
    if vae is None or not hasattr(vae, "decode"):
        raise ConfigError(f"{loaded.ref} has no VAE to export; use --component transformer")
    requested, forced = cfg.dtype_for("vae-decoder")
    dtype, notes = requested, []
    if requested == "fp16" and not forced and getattr(vae.config, "force_upcast", False):
        dtype = "fp32"
        notes.append("kept in fp32 although fp16 was requested: the VAE config sets force_upcast (it overflows "
                     "in fp16, as diffusers pipelines know); force it with --component-dtype vae-decoder=fp16")
    module, _ = _cast(vae, devices.torch_dtype(dtype), owned)
    b = range_dim("batch", ranges["images"], what="--batch")
    h = range_dim("height", ranges["height"])
    w = range_dim("width", ranges["width"])
    channels = vae.config.latent_channels
    io_spec = OnnxIO((OnnxInput("latent", "latent", (b, channels, h, w)),), outputs=("images",), ranges=(b, h, w))

    def make_kwargs(point, generator):
        latent = torch.randn(point["batch"], channels, point["height"], point["width"], generator=generator)
        return {"latent": latent.to(next(module.parameters()).device)}

    info = {"class": type(vae).__name__, "parameters": sum(p.numel() for p in module.parameters()),
            "requested_dtype": requested, "scaling_factor": vae.config.scaling_factor,
            "shift_factor": getattr(vae.config, "shift_factor", None),
            "latent_input": "latents / scaling_factor + shift_factor, as the pipeline passes them to vae.decode"}
    return Component("vae_decoder", "vae-decoder", module, io_spec, _vae_decode_call, make_kwargs, dtype, notes,
                     info=info)


def _text_components(loaded, cfg, ranges: dict, owned: bool) -> list[Component]:
    pairs = loaded.family.onnx_text_encoders(loaded.pipeline)
    if not pairs:
        raise ConfigError(f"{loaded.ref} has no text encoders to export (loaded without them?); "
                          "use --component transformer")
    dtype, _ = cfg.dtype_for("text-encoders")
    out = []
    for enc_attr, tok_attr in pairs:
        encoder = getattr(loaded.pipeline, enc_attr)
        cls = type(encoder).__name__
        if cls not in TEXT_ENCODERS:
            raise ConfigError(f"text encoder {enc_attr} is a {cls}; export supports {', '.join(TEXT_ENCODERS)}")
        call, outputs = TEXT_ENCODERS[cls]
        tokenizer = getattr(loaded.pipeline, tok_attr, None)
        limit = getattr(encoder.config, "max_position_embeddings", None) or MAX_TEXT_TOKENS
        seq = min(getattr(tokenizer, "model_max_length", None) or limit, limit, MAX_TEXT_TOKENS)
        module, kept = _cast(encoder, devices.torch_dtype(dtype), owned)
        b = range_dim("batch", ranges["images"], what="--batch")
        io_spec = OnnxIO((OnnxInput("input_ids", "input_ids", (b, seq), "int64"),), outputs=outputs, ranges=(b,))
        vocab = encoder.config.vocab_size

        def make_kwargs(point, generator, seq=seq, vocab=vocab, module=module):
            ids = torch.randint(0, vocab, (point["batch"], seq), generator=generator)
            return {"input_ids": ids.to(next(module.parameters()).device)}

        notes = [f"kept in fp32: {', '.join(kept)} (the class marks them _keep_in_fp32_modules)"] if kept else []
        notes.append(f"sequence length fixed at {seq} tokens (the tokenizer pads to it)")
        out.append(Component(enc_attr, "text-encoders", module, io_spec, call, make_kwargs, dtype, notes,
                             info={"class": cls, "tokenizer": tok_attr, "sequence_length": seq,
                                   "parameters": sum(p.numel() for p in module.parameters())}))
    return out


BUILDERS = {"transformer": lambda *a: [_denoiser_component(*a)], "vae-decoder": lambda *a: [_vae_component(*a)],
             "text-encoders": _text_components}


# ------------------------------------------------------------------------------------------ points


def _example_value(d: OnnxDim) -> int:
    """A value for tracing: not 0/1 in units of `multiple` (torch.export would specialize on it)."""
    if d.static:
        return d.opt
    lowest = 2 * d.multiple
    if d.opt >= lowest:
        return d.opt
    if d.max < lowest:
        raise ConfigError(f"the {d.name} range {d.min}:{d.opt}:{d.max} is too small to stay dynamic (export traces "
                          f"with at least {lowest}); raise MAX or give one value to fix it")
    return max(lowest, math.ceil(d.min / d.multiple) * d.multiple)


def _other_value(d: OnnxDim) -> int:
    if d.opt + d.multiple <= d.max:
        return d.opt + d.multiple
    return max(d.min, d.opt - d.multiple)


def example_point(io_spec: OnnxIO) -> dict[str, int]:
    return {d.name: _example_value(d) for d in io_spec.ranges}


def parity_points(io_spec: OnnxIO) -> list[dict[str, int]]:
    """The shapes parity is checked at: all minima; the next valid value above (or below) each optimum other
    than the batch's, other than the traced shape (an odd patch count where the optimum is even: shape arithmetic
    that only holds for even counts fails there); the batch's at the other minima; and the optima, the shape the
    engine is tuned for (the model's default resolution), when not already checked.

    Batch rows are independent, so another batch size is checked at the smallest image: an onnxruntime check on
    the CPU materialises every attention score matrix, and a larger batch at a large image is what would not fit
    in memory (SD3.5-Large at 1040 px: about 10 GB per extra row).
    """
    minima = {d.name: d.min for d in io_spec.ranges}
    points = [minima, {d.name: d.min if d.name == "batch" else _other_value(d) for d in io_spec.ranges}]
    if any(d.name == "batch" for d in io_spec.ranges):
        points.append(minima | {"batch": _other_value(next(d for d in io_spec.ranges if d.name == "batch"))})
    points.append({d.name: d.opt for d in io_spec.ranges})
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique
