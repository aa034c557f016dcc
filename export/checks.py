"""Checks run on every exported graph; each returns a record with `status` passed / failed / skipped.

1. `check_model`: the ONNX checker (path based, so external data works) and strict shape inference.
2. `check_no_float64`: no DOUBLE tensor, value, constant or Cast target (TensorRT has no FP64).
3. `check_parity`: onnxruntime against PyTorch on fresh inputs at shapes other than the export's.
4. `check_pruned_weights`: every pruned linear of a run is found in the graph with the same values and,
   for N:M runs, the pattern holds along the GEMM reduction dimension; `nm_crosscheck` cross-checks
   independently (polygraphy's weight walk, weights streamed one tensor at a time).
5. `check_structured_shapes`: shrunk linears have their shrunk shapes in the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from obsdiff import errors
from obsdiff.solver.obs import holds_nm

from . import graph as G
from . import qdq_checks as QC

log = logging.getLogger(__name__)

# Robust relative error (max |onnx - torch| / max |torch|) allowed per exported precision.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def first_line(exc: BaseException) -> str:
    return errors.first_line(exc)[:300]  # reasons are stored in sidecars: keep them short


def check_model(path: str | Path) -> tuple[dict, object | None]:
    """The ONNX checker and strict shape inference; returns the record and the inferred graph (no weights)."""
    onnx = G.require("onnx")
    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several unrelated classes
        return {"status": "failed", "reason": f"onnx.checker: {first_line(exc)}"}, None
    with tempfile.TemporaryDirectory() as tmp:
        inferred = Path(tmp) / "inferred.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        except Exception as exc:
            return {"status": "failed", "reason": f"shape inference: {first_line(exc)}"}, None
        model = onnx.load(str(inferred), load_external_data=False)
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    return {"status": "passed", "checker": "ok", "shape_inference": "ok (strict)", "inferred_outputs": outputs,
            "nodes": len(model.graph.node), "value_infos": len(model.graph.value_info)}, model


def check_no_float64(inferred_model) -> dict:
    uses = G.float64_uses(inferred_model)
    if uses:
        return {"status": "failed", "count": len(uses), "examples": uses[:5],
                "reason": f"{len(uses)} float64 tensors or casts remain (first: {uses[0]}); TensorRT has no FP64"}
    return {"status": "passed", "count": 0}


# ----------------------------------------------------------------------------------------------- parity


_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _providers() -> list[str]:
    ort = G.require("onnxruntime")
    available = ort.get_available_providers()
    return ["CPUExecutionProvider"] + [p for p in ("CUDAExecutionProvider",) if p in available]


def _session(path: Path, provider: str, dtype: str, tmp: Path):
    """An onnxruntime session, or one on an fp32-retyped copy where the runtime lacks half kernels.

    Graphs with external data or over `graph.EXTERNAL_COPY_BYTES` are retyped by `graph.float_view` (the
    weights stay in their file, Cast nodes widen them at run time) next to `path`; the view's files are
    named `.<stem>.fp32view.onnx*` and removed by `check_parity`. Big graphs run unoptimized: optimizations
    copy rewritten weights (constant folding would even materialize the fp32 casts of all of them).
    """
    onnx = G.require("onnx")
    ort = G.require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    head = onnx.load(str(path), load_external_data=False)
    big = G.has_external_data(head) or G.weight_bytes(head) > G.EXTERNAL_COPY_BYTES
    kwargs = {}
    note = QC.quantized_session_options(opts, head)
    if big:
        # Graph optimizations rewrite initializers (fusions, transposes, constant folding, prepacking): each
        # rewritten weight is a copy, and with them the session holds about twice the weights. Unoptimized,
        # onnxruntime maps the external data file and runs the graph as written.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    native_error = None
    if dtype != "bf16":  # no bf16 numpy feeds, and ORT CPU has no bf16 Conv/MatMul kernels
        try:
            return ort.InferenceSession(str(path), opts, providers=[provider], **kwargs), "native" + note
        except Exception as exc:  # NOT_IMPLEMENTED kernels, type errors
            native_error = first_line(exc)
    elem = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(dtype)
    if elem is None:
        return QC.reference_session(path, native_error)  # ReferenceEvaluator where onnxruntime has no QDQ kernel
    how = "in memory"
    if big:
        copy_path = path.parent / f".{path.stem}.fp32view.onnx"
        if not copy_path.exists():
            G.float_view(path, elem, copy_path)
        how = "weights cast at run time from external data"
    else:
        copy_path = tmp / f"upcast_{provider}.onnx"
        if not copy_path.exists():
            G.save_graph(G.upcast_copy(onnx.load(str(path)), elem), copy_path, external_data=True)
    del head
    mode = f"{dtype} graph retyped to fp32 ({how}; onnxruntime {provider} has no {dtype} kernels" + (
        f": {native_error})" if native_error else ")") + "; checks structure and weights, not half arithmetic"
    return ort.InferenceSession(str(copy_path), opts, providers=[provider], **kwargs), mode


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    ref = ref.astype(np.float64)
    out = out.astype(np.float64)
    if ref.shape != out.shape:
        return {"shape_torch": list(ref.shape), "shape_onnx": list(out.shape), "max_abs": None, "max_rel": None}
    finite = bool(np.isfinite(out).all() or np.array_equal(np.isfinite(out), np.isfinite(ref)))
    diff = np.abs(out - ref)
    scale = float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 0.0
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    return {"shape": list(ref.shape), "max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12),
            "ref_max_abs": scale, "finite": finite}


@contextlib.contextmanager
def _removing_views(path: Path):
    """Remove the fp32 views `_session` writes next to `path` (they share its external data file)."""
    try:
        yield
    finally:
        for f in path.parent.glob(f".{path.stem}.fp32view.onnx*"):
            f.unlink(missing_ok=True)


def torch_references(reference: Callable[[Sequence[torch.Tensor]], tuple[list[np.ndarray], str]],
                     cases: list[tuple[dict, tuple[torch.Tensor, ...]]]) -> tuple[list[list[np.ndarray]], str | None]:
    """The torch outputs of every case (numpy) and how they were computed: computed before the graph is
    loaded into onnxruntime, so the torch model can be freed first."""
    refs, ref_mode = [], None
    for _, args in cases:
        outs, ref_mode = reference(args)
        refs.append(outs)
    return refs, ref_mode


def check_parity(path: str | Path, reference, cases: list[tuple[dict, tuple[torch.Tensor, ...]]], dtype: str,
                 tolerance: float | None = None, output_names: Sequence[str] = (), slack: float = 0.0) -> dict:
    """Run the graph with onnxruntime (CPU, and CUDA when available) and PyTorch on the same `cases`.

    `cases`: (point, positional inputs) pairs; `reference` is either a function of the inputs that returns
    the torch outputs as numpy and a description of how they were computed, or `torch_references`' result
    for `cases`. Passes when every output's max |diff| / max |ref| is within `tolerance` (by precision:
    `TOLERANCES`), plus `slack / max |ref|` (quantized graphs: `qdq_checks.parity_bound`), and ORT's outputs
    are finite where torch's are.
    """
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    path = Path(path)
    refs, ref_mode = torch_references(reference, cases) if callable(reference) else reference
    runs, worst, worst_abs, failures = [], 0.0, 0.0, []
    with tempfile.TemporaryDirectory() as tmp, _removing_views(path):
        for provider in _providers():
            try:
                sess, mode = _session(path, provider, dtype, Path(tmp))
            except Exception as exc:
                failures.append(f"{provider} cannot load the graph: {first_line(exc)}")
                continue
            inputs = sess.get_inputs()
            for (point, args), ref in zip(cases, refs, strict=True):
                feed = {i.name: _to_numpy(a).astype(_ORT_NUMPY.get(i.type, np.float32))
                        for i, a in zip(inputs, args, strict=True)}
                try:
                    outs = sess.run(None, feed)
                except Exception as exc:
                    failures.append(f"{provider} fails at {point}: {first_line(exc)}")
                    continue
                names = list(output_names) or [o.name for o in sess.get_outputs()]
                per_output = {n: compare(r, o) for n, r, o in zip(names, ref, outs, strict=True)}
                runs.append({"provider": provider, "mode": mode, "point": point, "outputs": per_output})
                for n, c in per_output.items():
                    if c["max_rel"] is None:
                        failures.append(f"{n} has shape {c['shape_onnx']} in onnx, {c['shape_torch']} in torch")
                        continue
                    worst, worst_abs = max(worst, c["max_rel"]), max(worst_abs, c["max_abs"])
                    if not c["finite"]:
                        failures.append(f"{n} is not finite in onnxruntime ({provider}) at {point}")
                    elif c["max_rel"] > (allowed := tolerance + slack / max(c["ref_max_abs"], 1e-12)):
                        failures.append(f"{n} max relative error {c['max_rel']:.3g} > {allowed:.3g} ({provider}, "
                                        f"{point})")
            del sess, inputs  # one session at a time: each holds the weights
    record = {"status": "failed" if failures else "passed", "tolerance_rel": tolerance, "slack_abs": slack,
              "max_rel": worst, "max_abs": worst_abs, "reference": ref_mode, "points": [p for p, _ in cases],
              "runs": runs}
    if failures:
        record["reason"] = failures[0] + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else "")
    return record


# ----------------------------------------------------------------------------------- pruned weights


def _find_weights(model, base_dir: Path, prefix: str, weights: dict[str, torch.Tensor], refs=None) -> dict:
    """Locate each torch weight (by linear module path) in the graph: name scopes first, then by value.

    Returns {module: (WeightRef | None, array in torch layout (out, in) or None)}. `refs`: the graph's
    `linear_weights`, when the caller asks module by module.
    """
    refs = G.linear_weights(model, prefix) if refs is None else refs
    wanted = {refs[m].initializer for m in weights if m in refs}
    arrays = G.initializer_arrays(model, wanted, base_dir)
    found = {}
    for module in weights:
        ref = refs.get(module)
        if ref is not None and ref.initializer in arrays:
            arr = arrays[ref.initializer]
            found[module] = (ref, arr if ref.out_in else arr.T)
        else:
            found[module] = (None, None)
    missing = [m for m, (ref, _) in found.items() if ref is None]
    if missing:  # metadata lost (another exporter, a graph pass): match by exact value
        found |= _match_by_value(model, base_dir, {m: weights[m] for m in missing})
    return found


def _match_by_value(model, base_dir: Path, weights: dict[str, torch.Tensor]) -> dict:
    """Find each weight among the initializers of its shape (or transposed shape) by exact value, reading
    one initializer at a time."""
    out = {}
    for module, w in weights.items():
        target = _to_numpy(w).astype(np.float32)
        names = {t.name for t in model.graph.initializer if tuple(t.dims) in (target.shape, target.T.shape)}
        hit = None
        for name, arr in G.iter_initializers(model, names, base_dir):
            if arr.shape == target.shape and np.array_equal(arr.astype(np.float32), target):
                hit = (G.WeightRef(module, name, "", "by value", True), arr)
            elif arr.shape == target.T.shape and np.array_equal(arr.T.astype(np.float32), target):
                hit = (G.WeightRef(module, name, "", "by value", False), arr.T)
            if hit:
                break
        out[module] = hit or (None, None)
    return out


def check_pruned_weights(model, base_dir: str | Path, prefix: str, weights: dict[str, torch.Tensor],
                         nm: tuple[int, int] | None) -> dict:
    """Every pruned weight is in the graph, equal to the torch weight, and (N:M) keeps its pattern.

    `weights`: pruned linear module path -> the torch weight as exported (out, in). The N:M pattern is
    checked along the torch input dimension (the GEMM reduction dimension), whatever the ONNX layout.
    """
    refs = G.linear_weights(model, prefix)
    missing, mismatched, violating, zeros, total = [], [], [], 0, 0
    via = {"name_scopes": 0, "value": 0}
    for module in weights:  # one weight in memory at a time
        ((_, (ref, arr)),) = _find_weights(model, Path(base_dir), prefix, {module: weights[module]}, refs).items()
        if ref is None:
            missing.append(module)
            continue
        via["value" if ref.op_type == "by value" else "name_scopes"] += 1
        target = _to_numpy(weights[module]).astype(np.float32)
        arr = arr.astype(np.float32)
        if arr.shape != target.shape or not np.array_equal(arr, target):
            mismatched.append(module)
            continue
        zeros += int((arr == 0).sum())
        total += arr.size
        if nm is not None and not holds_nm(arr, nm):
            violating.append(module)
    record = {"checked": len(weights) - len(missing), "missing": len(missing), "mismatched": len(mismatched),
              "violating": len(violating) if nm else None, "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
              "found_via": via, "zero_fraction": zeros / total if total else None}
    problems = [("missing from the graph", missing), ("different from the torch weight", mismatched),
                (f"violate {record['pattern']}", violating)]
    bad = [(what, names) for what, names in problems if names]
    record["status"] = "failed" if bad or not weights else "passed"
    if bad:
        what, names = bad[0]
        record["reason"] = f"{len(names)} pruned weights {what} (first: {names[0]})"
        record["examples"] = names[:5]
    elif not weights:
        record["reason"] = "the run lists no pruned layers"
    return record


def nm_crosscheck(path: str | Path, nm: tuple[int, int], expected: int, polygraphy_max_weights: int) -> dict:
    """Count the graph's N:M weight tensors independently of `check_pruned_weights`, one tensor at a time.

    Polygraphy's `SparsityPruner` walks the graph without weights and names every MatMul/Gemm/Conv weight
    initializer with the axis its 2:4 pattern runs along (the GEMM reduction dimension). Each candidate
    is then read alone from the external data file (`graph.read_initializer`, offset and length) and
    checked: by polygraphy's own `process_tensor` (a pure-Python loop) when the candidates hold at most
    `polygraphy_max_weights` values and the pattern is 2:4, else by a vectorized numpy scan of the same
    rule (at most N non-zeros in every group of M consecutive values along the axis). `tool` records which.
    Fails when fewer tensors hold the pattern than the `expected` pruned linears.
    """
    import time

    try:
        from polygraphy.logger import G_LOGGER
        from polygraphy.tools import sparse
    except ImportError:
        return {"status": "skipped", "reason": "skipped: polygraphy not installed (it finds the weights and axes)"}
    onnx = G.require("onnx")
    from onnx import numpy_helper

    t0 = time.perf_counter()
    path = Path(path)
    n, m = nm
    head = onnx.load(str(path), load_external_data=False)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), contextlib.redirect_stdout(io.StringIO()):
        infos = sparse.SparsityPruner(head)._walk_nodes()  # reads dims and types only
    infos += QC.code_weights(head)  # integer and float8 codes behind DequantizeLinear: polygraphy skips them
    by_name = {t.name: t for t in head.graph.initializer}
    infos = [p for p in infos if by_name[p.name].dims[p.axis] % m == 0]
    weights = sum(int(np.prod(by_name[p.name].dims)) for p in infos)
    use_polygraphy = nm == (2, 4) and weights <= polygraphy_max_weights
    tool = ("polygraphy SparsityPruner walk + polygraphy process_tensor (one tensor at a time)" if use_polygraphy
            else f"polygraphy SparsityPruner walk + streamed numpy {n}:{m} scan (one tensor at a time)")
    sparse_names = []
    for p in infos:
        arr = G.read_initializer(by_name[p.name], path.parent)
        if use_polygraphy and not QC.is_codes(by_name[p.name]):
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL), contextlib.redirect_stdout(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # its float32 min() scan overflows harmlessly
                # bf16 arrives widened to fp32 (exact): polygraphy 0.53's own bf16 branch misreads tensors
                holds = sparse.process_tensor(p, numpy_helper.from_array(arr.astype(np.float32, copy=False),
                                                                         p.name), True)
        else:
            holds = holds_nm(np.moveaxis(arr, p.axis, -1), nm)
        del arr
        if holds:
            sparse_names.append(p.name)
    record = {"tool": tool, "pattern": f"{n}:{m}", "weights": weights, "tensors": len(infos),
              "code_tensors": sum(QC.is_codes(by_name[p.name]) for p in infos),  # scanned by numpy
              "sparse_tensors": len(sparse_names), "expected_at_least": expected,
              "agrees": len(sparse_names) >= expected, "seconds": time.perf_counter() - t0}
    if nm == (2, 4):
        record["sparse_2_4_tensors"] = len(sparse_names)
    if record["agrees"]:
        return {"status": "passed"} | record
    return {"status": "failed", "reason": f"the independent scan finds {len(sparse_names)} {n}:{m} weight tensors, "
                                          f"fewer than the {expected} pruned linears"} | record


# ------------------------------------------------------------------------------------- structured


def check_structured_shapes(model, base_dir: str | Path, prefix: str, linears: dict[str, torch.nn.Linear],
                            dense_shapes: dict[str, tuple[int, int]]) -> dict:
    """The graph's weights of the prunable linears have the shrunk torch shapes (out, in)."""
    weights = {name: lin.weight.detach() for name, lin in linears.items()}
    found = _find_weights(model, Path(base_dir), prefix, weights)
    missing = [m for m, (ref, _) in found.items() if ref is None]
    wrong = [m for m, (ref, arr) in found.items() if ref is not None and tuple(arr.shape) != tuple(weights[m].shape)]
    shrunk = {m: {"dense": list(dense_shapes[m]), "onnx": list(arr.shape)} for m, (ref, arr) in found.items()
              if ref is not None and m in dense_shapes and tuple(arr.shape) != tuple(dense_shapes[m])}
    record = {"checked": len(found) - len(missing), "missing": len(missing), "mismatched": len(wrong),
              "shrunk": len(shrunk), "examples": dict(list(shrunk.items())[:6])}
    if missing or wrong:
        names = missing or wrong
        what = "missing from the graph" if missing else "with shapes other than the shrunk torch model"
        record |= {"status": "failed", "reason": f"{len(names)} linears {what} (first: {names[0]})"}
    else:
        record["status"] = "passed"
    return record
