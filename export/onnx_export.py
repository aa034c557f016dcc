"""Pipeline components (denoiser, VAE decoder, text encoders) to ONNX, checked, with JSON sidecars.

    export_onnx("runs/x", "runs/x/onnx", ExportConfig(dtype="fp16")) -> report dict

writes `<component>.onnx` (+ `<component>.onnx.data` for > 2 GB or `external_data=True`) and
`<component>.json` per component, plus `export.json`, into a directory that appears only when every
check passed. Input/output names follow TensorRT's diffusion demo so engines drop into its serving
code; the denoiser's signature comes from its family adapter (`ModelFamily.onnx_io`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from obsdiff.errors import ObsdiffError
from obsdiff.models.registry import OnnxDim, OnnxIO
from obsdiff.runs.artifacts import check_writable, machine, sha256_file, staged_dir, versions, write_json

from . import checks as C
from . import graph as G
from . import passes as P
from . import qdq as Q
from . import qdq_checks as QC
from .components import (
    BUILDERS,
    Component,
    example_point,
    parity_points,
    range_keys,
    resolve_ranges,
    select_profile,
)
from .config import AUTO, ExportConfig
from .lowering import custom_translations
from .quiet import quiet

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WRAPPER_ATTR = "model"  # the export wrapper's attribute: initializers are renamed without it
SIDECAR_HASH_LIMIT = 2 << 30  # hash source weight files up to this total size


class ExportCheckError(ObsdiffError):
    """An exported graph failed one of its checks; nothing was written."""


class ExportFailedError(ObsdiffError):
    """The exporter could not convert the module."""


# ------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def linear_as_gemm(module: nn.Module, enabled: bool = True):
    """Make every nn.Linear flatten its input to 2-D, so exporters emit `Gemm` (transB=1) reading the weight
    initializer by its torch parameter name, instead of `MatMul` on an anonymous transposed copy."""
    if not enabled:
        yield
        return
    patched = []

    def forward(self, x):
        y = nn.functional.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.forward = forward.__get__(m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _torch_dims(io_spec: OnnxIO) -> tuple:
    """torch.export dynamic shapes (one dict per positional input); inputs sharing a dim share the symbol."""
    symbols = {}
    for d in io_spec.dims().values():
        if d.static:
            continue
        if d.multiple > 1:
            div = torch.export.Dim(f"{d.name}_div{d.multiple}", min=max(1, d.min // d.multiple),
                                   max=d.max // d.multiple)
            symbols[d.name] = d.multiple * div
        else:
            symbols[d.name] = torch.export.Dim(d.name, min=d.min, max=d.max)
    return tuple({axis: symbols[d.name] for axis, d in enumerate(i.shape) if isinstance(d, OnnxDim) and not d.static}
                 or None for i in io_spec.inputs)


def _drop_weights(program, module: nn.Module) -> None:
    """Detach the exported graph, and every IR value left over from exporting, from `module`'s tensors once
    the graph is saved. onnxscript's rewrite rules keep the last graph they matched in module globals
    (onnxscript 0.7), and values replaced by its constant folding stay referenced from there: without this
    they hold every torch parameter, and freeing the model frees nothing."""
    graph = getattr(getattr(program, "model", None), "graph", None)
    for value in list(graph.initializers.values()) if graph is not None else []:
        value.const_value = None
    try:
        import onnx_ir as ir
    except ImportError:
        return
    ours = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}
    for obj in gc.get_objects():
        if isinstance(obj, ir.Value) and isinstance(getattr(obj.const_value, "raw", None), torch.Tensor) \
                and obj.const_value.raw.numel() and obj.const_value.raw.untyped_storage().data_ptr() in ours:
            obj.const_value = None


def _run_exporter(comp: Component, cfg: ExportConfig, path: Path) -> None:
    wrapper = comp.wrapper()
    args = comp.inputs_at(example_point(comp.io), cfg.seed)
    names = [i.name for i in comp.io.inputs]
    outputs = list(comp.io.outputs)
    try:
        with torch.no_grad(), comp.context(), linear_as_gemm(wrapper, cfg.linear_as_gemm), quiet(), \
                Q.plain_linears(wrapper):
            if cfg.exporter == "dynamo":
                G.require("onnxscript", "the dynamo ONNX exporter")
                program = torch.onnx.export(wrapper, args, dynamic_shapes=(_torch_dims(comp.io),), input_names=names,
                                            output_names=outputs, opset_version=cfg.opset, dynamo=True, optimize=True,
                                            verbose=False, custom_translation_table=custom_translations(cfg.opset))
                program.save(str(path), external_data=True if cfg.external_data else None)
                _drop_weights(program, comp.module)
            else:
                axes = {i.name: {a: d.name for a, d in enumerate(i.shape) if isinstance(d, OnnxDim) and not d.static}
                        for i in comp.io.inputs}
                # the TorchScript exporter invents output dim names; every output is batch-first, and a
                # denoiser's latent has its first input's shape
                first = comp.io.inputs[0].shape
                for o in outputs:
                    like = axes[comp.io.inputs[0].name] if comp.kind == "transformer" else {}
                    batch = {0: first[0].name} if isinstance(first[0], OnnxDim) and not first[0].static else {}
                    axes[o] = batch | like
                torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=outputs,
                                  dynamic_axes={k: v for k, v in axes.items() if v}, opset_version=cfg.opset,
                                  do_constant_folding=True)
    except ObsdiffError:
        raise
    except Exception as exc:
        hint = "try --exporter dynamo" if cfg.exporter == "legacy" else "run with -vv for the exporter's traceback"
        log.debug("exporter failure", exc_info=True)
        raise ExportFailedError(f"the {cfg.exporter} exporter cannot export {comp.name} ({type(comp.module).__name__}):"
                                f" {C.first_line(exc)}; {hint}") from exc
    if not path.exists():
        raise ExportFailedError(f"the {cfg.exporter} exporter wrote no file for {comp.name}")


def _finalize(comp: Component, cfg: ExportConfig, path: Path) -> dict:
    """Graph passes after export: readable initializer and dim names, permutation Einsums as Transpose, quantized
    linears as QuantizeLinear/DequantizeLinear (`qdq.quantize_graph`)."""
    model = G.load_graph(path)
    renamed = P.strip_initializer_prefix(model, WRAPPER_ATTR + ".")
    einsums = G.einsum_permutations_to_transpose(model)
    dims = {i.name: [d.name if isinstance(d, OnnxDim) and not d.static else None for d in i.shape]
            for i in comp.io.inputs}
    dim_names = P.rename_dims(model, dims)
    if comp.kind == "transformer" and cfg.exporter == "legacy":
        P.copy_shape(model, comp.io.inputs[0].name, comp.io.outputs[0])
    quant = Q.quantize_graph(model, WRAPPER_ATTR + ".", comp.module, cfg.output_quant)
    onnx = G.require("onnx")
    meta = {"obsdiff.component": comp.name, "obsdiff.dtype": comp.dtype, "obsdiff.version": versions()["obsdiff"]}
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))
    if quant is not None and G.has_external_data(model):
        Q.save_compacted(model, path)  # the replaced float weights' bytes leave the data file
    else:
        G.save_graph(model, path, external_data=cfg.external_data)
    return {"initializers_renamed": renamed, "einsum_to_transpose": einsums, "dims_renamed": dim_names,
            "quantization": quant}


def _io_records(comp: Component, model) -> tuple[list, list]:
    types = {vi.name: vi.type.tensor_type for vi in [*model.graph.input, *model.graph.output]}

    def shape_of(name):
        return [d.dim_param or d.dim_value for d in types[name].shape.dim]

    inputs = []
    for i in comp.io.inputs:
        profile = {k: [d.values()[j] if isinstance(d, OnnxDim) else d for d in i.shape]
                   for j, k in enumerate(("min", "opt", "max"))}
        inputs.append({"name": i.name, "dtype": G.elem_type_name(types[i.name].elem_type), "shape": shape_of(i.name),
                       "feeds": i.kwarg, "profile": profile})
    outputs = [{"name": o, "dtype": G.elem_type_name(types[o].elem_type), "shape": shape_of(o)}
               for o in comp.io.outputs]
    return inputs, outputs


# ------------------------------------------------------------------------------------------- checks


def _reference(comp: Component):
    """Torch outputs in the exported precision; fp32 (of the same weights) where the device lacks kernels."""
    wrapper = comp.wrapper()
    fallback: list = []

    def run(args):
        with torch.no_grad():
            if not fallback:
                try:
                    out = wrapper(*args)
                    return _numpy_outputs(out), f"torch {comp.dtype} on {args[0].device.type}"
                except (RuntimeError, NotImplementedError) as exc:
                    if comp.dtype == "fp32":
                        raise
                    fallback.append((copy.deepcopy(wrapper).float(), C.first_line(exc)))
            model32, why = fallback[0]
            args32 = [a.float() if a.is_floating_point() else a for a in args]
            return _numpy_outputs(model32(*args32)), f"torch fp32 of the {comp.dtype} weights ({comp.dtype}: {why})"

    return run


def _numpy_outputs(out) -> list:
    outs = out if isinstance(out, tuple | list) else (out,)
    return [C._to_numpy(o) for o in outs]


def _run_checks(comp: Component, loaded, cfg: ExportConfig, path: Path, references, owned: bool) -> dict:
    """Every check of one exported graph. The checks that need the torch module run first; then, if this
    export owns the module, it is freed (`_release`) before parity loads the graph into onnxruntime, and the
    N:M cross-check reads the graph's weights one tensor at a time."""
    checks: dict[str, dict] = {}
    record, inferred = C.check_model(path)
    checks["onnx_checker"] = record
    if inferred is None:
        return checks
    checks["no_float64"] = C.check_no_float64(inferred)
    del inferred
    run = loaded.run if comp.kind == "transformer" else None
    prefix = WRAPPER_ATTR + "."
    nm, expected = None, 0
    if comp.kind == "transformer":
        model = G.load_graph(path)
        if run is None or not run.layers:
            checks["pruned_weights"] = {"status": "skipped", "reason": "skipped: not a pruned run"}
        else:
            from obsdiff.solver.obs import parse_nm

            nm = parse_nm(run.sparsity_type)
            mods = dict(comp.module.named_modules())
            names = [r["name"] for r in run.layers if not r.get("skipped")]
            missing = [n for n in names if not isinstance(mods.get(n), nn.Linear)]
            if missing:
                raise ExportCheckError(f"the run lists pruned layer {missing[0]} that the denoiser does not have; "
                                       "the run directory does not match its model")
            weights = {n: QC.graph_weight(mods[n]) for n in names}  # the codes of quantized layers
            checks["pruned_weights"] = C.check_pruned_weights(model, path.parent, prefix, weights, nm)
            QC.add_layer_patterns(checks["pruned_weights"], model, path.parent, prefix, mods, names, nm)
            if nm is not None:
                expected = sum(1 for w in weights.values() if w.shape[1] % nm[1] == 0)
            del weights, mods
        if run is not None and run.shrink_plan:
            family = loaded.family
            linears = {n: m for b in family.blocks(comp.module) for n, m in family.prunable_linears(b).items()}
            checks["structured_shapes"] = C.check_structured_shapes(model, path.parent, prefix, linears,
                                                                    _dense_shapes(comp.module, linears))
            del linears
        del model
    bound = QC.parity_bound(comp.module, comp.dtype, C.TOLERANCES[comp.dtype], cfg.output_quant)  # None: no QDQ
    if owned:
        _release(comp, loaded)
    if cfg.parity:
        cases, refs = references
        checks["parity"] = C.check_parity(path, refs, cases, comp.dtype, output_names=comp.io.outputs,
                                          slack=bound["quantization_abs"] if bound else 0.0)
        checks["parity"] |= {"bound": bound} if bound else {}
    else:
        checks["parity"] = {"status": "skipped", "reason": "skipped: parity=False"}
    if nm is not None:
        checks["nm_crosscheck"] = C.nm_crosscheck(path, nm, expected, cfg.polygraphy_max_weights)
        if checks["nm_crosscheck"]["status"] == "failed":
            log.warning("%s", checks["nm_crosscheck"]["reason"])
    return checks


def _dense_shapes(denoiser: nn.Module, names) -> dict[str, tuple[int, int]]:
    """Weight shapes of the unshrunk architecture (built on the meta device from the unchanged config)."""
    with torch.device("meta"):
        dense = type(denoiser).from_config(denoiser.config)
    mods = dict(dense.named_modules())
    return {n: tuple(mods[n].weight.shape) for n in names if n in mods}


# -------------------------------------------------------------------------------------- orchestration


def _source(loaded, comp: Component) -> dict:
    src = {"model": loaded.ref, "family": loaded.family.name, "builtin": loaded.builtin,
           "pipeline_dir": str(loaded.path)}
    if loaded.run is not None and comp.kind == "transformer":
        run = loaded.run
        src["run"] = {"path": str(Path(loaded.ref).expanduser().resolve()), "base_model": run.base_model,
                      "denoiser_sha256": run.denoiser_sha256, "prune": run.prune, "sparsity": run.sparsity}
        return src
    attr = {"vae-decoder": "vae"}.get(comp.kind, comp.name)
    folder = Path(loaded.path) / attr
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files and sum(f.stat().st_size for f in files) <= SIDECAR_HASH_LIMIT:
        src["weights_sha256"] = {f"{attr}/{f.name}": sha256_file(f) for f in files}
    return src


def _resolve(model, cfg: ExportConfig) -> tuple[ExportConfig, dict]:
    """`cfg.resolve` for `model`: `auto` dtype is the family's precision for the denoiser (`onnx_dtype`), read
    off its config before any weight loads (they load in the resolved precision); the opset is at least what the
    denoiser's quantized layers need (`qdq.required_opset`)."""
    if cfg.dtype != AUTO and "transformer" not in cfg.components():
        return cfg.resolve()
    from obsdiff.runs.loading import LoadedModel, as_loaded, load_denoiser

    if isinstance(model, str | Path):
        found = load_denoiser(str(model), "fp32", "cpu", weights=False)  # meta device: config only
        denoiser, family = found.denoiser, found.family
    else:
        loaded = model if isinstance(model, LoadedModel) else as_loaded(model)
        denoiser, family = loaded.denoiser, loaded.family
    return cfg.resolve(family.onnx_dtype(denoiser) if cfg.dtype == AUTO else None, Q.required_opset(denoiser))


def _load(model, cfg: ExportConfig):
    """The model to export and whether this export owns it (and may cast and free its components)."""
    from obsdiff.runs.loading import LoadedModel, as_loaded

    if isinstance(model, str | Path):
        if not cfg.resolved:
            cfg, _ = _resolve(model, cfg)
        return _load_components(str(model), cfg), True
    return (model if isinstance(model, LoadedModel) else as_loaded(model)), False


def _load_components(ref: str, cfg: ExportConfig):
    """Load only what is exported: the denoiser alone (in the export precision) for the default export, with
    the pipeline's other exported parts only when asked for; shapes and text lengths come from configs.

    Without the pipeline, the family's ONNX methods get a stand-in that has the denoiser and, per tokenizer,
    its configured `model_max_length`: all they read from a pipeline.
    """
    import json

    from obsdiff.runs.loading import _from_pretrained, load_denoiser

    kinds = cfg.components()
    found = load_denoiser(ref, cfg.dtype_for("transformer")[0], cfg.device, weights="transformer" in kinds)
    denoiser, family = found.denoiser, found.family
    if kinds == ["transformer"]:
        tokenizers = {k: SimpleNamespace(model_max_length=v) for k, v in found.tokenizer_max_length.items()}
        pipeline = SimpleNamespace(**{family.denoiser_attr: denoiser}, **tokenizers)
    else:
        index = json.loads((found.path / "model_index.json").read_text())
        unwanted = {k for k in index if k.startswith("text_encoder")} if "text-encoders" not in kinds else set()
        unwanted |= {"vae"} if "vae-decoder" not in kinds else set()
        skip = {k: None for k in unwanted if k in index and (index[k] or [None])[0] is not None}
        # the other parts load in fp32 and are cast in place per component (the VAE may have to stay fp32)
        pipeline = _from_pretrained(found.path, found.ref, torch.float32,
                                    **{family.denoiser_attr: denoiser}, **skip)
        if cfg.device != "cpu":
            pipeline.to(cfg.device)
    return found.with_pipeline(pipeline)


def _release(comp: Component, loaded) -> None:
    """Drop every reference this export holds to the component's torch module, so its memory is freed before
    onnxruntime loads the graph's copy of the weights."""
    attr = {"transformer": loaded.family.denoiser_attr, "vae-decoder": "vae"}.get(comp.kind, comp.name)
    if getattr(loaded.pipeline, attr, None) is not None:
        setattr(loaded.pipeline, attr, None)
    comp.module = comp.make_kwargs = comp.context = None
    gc.collect()
    try:  # glibc keeps freed heap pages mapped: hand them back before onnxruntime allocates its copy
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def export_onnx(model, out_dir: str | Path, config: ExportConfig | None = None, force: bool = False,
                progress: bool = True) -> dict:
    """Export the configured components of `model` (a `--model` value, run directory, `LoadedModel` or
    diffusers pipeline) to `out_dir`, check each graph, and write sidecars.

    The directory appears only if every component exported and passed its checks; a failed check raises
    `ExportCheckError`. A model passed in memory is not modified (components are copied before casting).
    Returns the report that is also written to `out_dir/export.json`.
    """
    cfg = config or ExportConfig()
    out_dir = check_writable(out_dir, force)
    for dep in ("onnx", "onnxruntime"):
        G.require(dep)
    t_start = time.perf_counter()
    cfg, choices = _resolve(model, cfg)
    loaded, owned = _load(model, cfg)
    ranges, profile = resolve_ranges(loaded, cfg)
    components = [c for kind in cfg.components() for c in BUILDERS[kind](loaded, cfg, ranges, owned)]
    used = {key for c in components for key in range_keys(c).values()}
    choices["profile"] = select_profile(profile, {k: k for k in ranges if k in used})
    report = {"format": FORMAT_VERSION, "artifact": "onnx-export", "source": loaded.ref, "config": cfg.to_dict(),
              "ranges": ranges, "choices": choices, "components": {}}
    bar = tqdm(total=len(components), desc="onnx export", unit="component", leave=False, disable=not progress)
    with staged_dir(out_dir, force=force) as tmp, bar:
        for comp in components:
            sidecar = _export_component(comp, loaded, cfg, tmp, owned, bar, choices)
            bar.update()
            report["components"][comp.name] = {k: sidecar[k] for k in ("file", "bytes", "dtype", "export_seconds")} | {
                "checks": {k: v["status"] for k, v in sidecar["checks"].items()},
                "quantization": {k: v for k, v in (sidecar["quantization"] or {}).items() if k != "layers"} or None}
        report |= {"seconds": time.perf_counter() - t_start, "versions": versions(), "machine": machine(),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(tmp / "export.json", report)
    return report


def _component_choices(comp: Component, cfg: ExportConfig, choices: dict) -> dict:
    """Why `comp` has its precision, opset and optimization profile: the export's choices, narrowed to it.

    Its precision can differ from the export's: forced per component, or changed by the component's policy
    (a VAE kept in fp32), which its notes explain."""
    requested, forced = cfg.dtype_for(comp.kind)
    dtype = choices["dtype"]
    if forced:
        dtype = {"value": comp.dtype, "requested": requested, "why": "given (--component-dtype)"}
    elif comp.dtype != requested:
        dtype = {"value": comp.dtype, "requested": requested, "why": "; ".join(comp.notes)}
    return {"dtype": dtype, "opset": choices["opset"], "profile": select_profile(choices["profile"], range_keys(comp))}


def _export_component(comp: Component, loaded, cfg: ExportConfig, out: Path, owned: bool, bar=None,
                      choices: dict | None = None) -> dict:
    """Export one component and run its checks; `bar` (a tqdm) shows which stage is running. `choices`: why
    the export has its precision, opset and profile (`export_onnx`), recorded in the sidecar."""

    def stage(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{comp.name}: {text}")

    path = out / f"{comp.name}.onnx"
    log.info("exporting %s (%s, %s exporter)", comp.name, comp.dtype, cfg.exporter)
    t_ref = time.perf_counter()
    # torch outputs first: the module can then be freed before onnxruntime holds the graph's weights
    references = None
    if cfg.parity:
        stage("torch reference outputs")
        cases = [(p, comp.inputs_at(p, cfg.seed + 1 + k)) for k, p in enumerate(parity_points(comp.io))]
        with Q.output_quantizers(comp.module, keep=cfg.output_quant):
            references = (cases, C.torch_references(_reference(comp), cases))
    ref_seconds = time.perf_counter() - t_ref
    t0 = time.perf_counter()
    stage(f"{cfg.exporter} export")
    _run_exporter(comp, cfg, path)
    gc.collect()  # the exporter's program (and its tensors) is garbage now
    passes = _finalize(comp, cfg, path)
    quantization = passes.pop("quantization")
    export_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    stage("checks (onnx checker, pruned weights, parity)")
    checks = _run_checks(comp, loaded, cfg, path, references, owned)
    check_seconds = time.perf_counter() - t1 + ref_seconds
    model = G.load_graph(path)
    inputs, outputs = _io_records(comp, model)
    data = [out / name for name in G.external_files(model)]
    files = [path, *data]
    sidecar = {
        "format": FORMAT_VERSION,
        "artifact": "onnx",
        "component": comp.name,
        "kind": comp.kind,
        "file": path.name,
        "external_data": [d.name for d in data] or None,
        "sha256": sha256_file(path),
        "external_data_sha256": {d.name: sha256_file(d) for d in data} or None,
        "bytes": sum(f.stat().st_size for f in files),
        "dtype": comp.dtype,
        "requested_dtype": cfg.dtype_for(comp.kind)[0],
        "notes": comp.notes,
        "opset": cfg.opset,
        "exporter": cfg.exporter,
        "linear_as_gemm": cfg.linear_as_gemm,
        "inputs": inputs,
        "outputs": outputs,
        "dims": {d.name: {"min": d.min, "opt": d.opt, "max": d.max, "multiple": d.multiple}
                 for d in (*comp.io.ranges, *comp.io.dims().values())},
        "module": comp.info,
        "choices": _component_choices(comp, cfg, choices) if choices else None,
        "quantization": quantization,
        "source": _source(loaded, comp),
        "graph": {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer)} | passes,
        "checks": checks,
        "export_seconds": export_seconds,
        "check_seconds": check_seconds,
        "versions": versions(),
        "machine": machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / f"{comp.name}.json", sidecar)
    failed = [(name, rec) for name, rec in checks.items() if rec["status"] == "failed"]
    if failed:
        name, rec = failed[0]
        more = f" (also failed: {', '.join(n for n, _ in failed[1:])})" if len(failed) > 1 else ""
        raise ExportCheckError(f"{comp.name}.onnx failed the {name} check: {rec.get('reason', 'see sidecar')}{more}; "
                               "nothing was written")
    return sidecar
