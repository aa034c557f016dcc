"""ONNX graph utilities: the passes applied after export and the lookups the checks need.

Everything here works on `onnx.ModelProto`s loaded without their external data where possible, so a
multi-gigabyte model is rewritten without reading its weights. onnx is imported lazily (see `require`).
"""

from __future__ import annotations

import ast
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from obsdiff.errors import MissingDependencyError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "obsdiff[onnx]"'
# Graphs whose weights exceed this many bytes are never copied through an in-memory protobuf (which cannot
# pass 2 GB and doubles the memory): copies keep their weights in external data, read tensor by tensor.
EXTERNAL_COPY_BYTES = 1 << 30
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # dynamo exporter: the torch module path of each node


def require(module: str, purpose: str = "ONNX export"):
    """Import an optional dependency or raise a one-line `MissingDependencyError` that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("_", "-")
        raise MissingDependencyError(f"{package} is needed for {purpose} and is not installed; "
                                     f"{INSTALL_HINT}") from None


def elem_type_name(elem_type: int) -> str:
    """ONNX element type -> numpy-style name ("float32", "float16", "bfloat16", "int64", ...)."""
    onnx = require("onnx")
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def load_graph(path: str | Path, weights: bool = False):
    onnx = require("onnx")
    return onnx.load(str(path), load_external_data=weights)


def has_external_data(model) -> bool:
    onnx = require("onnx")
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def external_files(model) -> list[str]:
    """The external data files (relative locations) a model loaded without its weights refers to."""
    onnx = require("onnx")
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files |= {e.value for e in t.external_data if e.key == "location"}
    return sorted(files)


def all_graphs(graph):
    """The graph and every subgraph of its If/Loop/Scan nodes, depth first."""
    onnx = require("onnx")
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


# ---------------------------------------------------------------------------------------------- passes


def einsum_permutations_to_transpose(model) -> int:
    """Rewrite single-input Einsums that only permute axes (SD3's unpatchify) as Transpose.

    ONNX Einsum has no bfloat16 type, and a Transpose is what it computes anyway.
    """
    onnx = require("onnx")
    count = 0
    for g in all_graphs(model.graph):
        for i, node in enumerate(list(g.node)):
            if node.op_type != "Einsum" or len(node.input) != 1:
                continue
            eq = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "equation")
            eq = eq.decode() if isinstance(eq, bytes) else eq
            lhs, _, rhs = eq.replace(" ", "").partition("->")
            if "." in lhs or len(set(lhs)) != len(lhs) or sorted(lhs) != sorted(rhs):
                continue
            new = onnx.helper.make_node("Transpose", list(node.input), list(node.output), name=node.name,
                                        perm=[lhs.index(c) for c in rhs])
            new.metadata_props.extend(node.metadata_props)
            g.node.remove(node)
            g.node.insert(i, new)
            count += 1
    return count


def save_graph(model, path: str | Path, external_data: bool) -> None:
    """Write `model` to `path`; with `external_data`, weights go to `<file>.data` next to it.

    A model loaded without its weights keeps pointing at its existing data file.
    """
    onnx = require("onnx")
    path = Path(path)
    if external_data and not has_external_data(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# ------------------------------------------------------------------------------------------- lookups


def float64_uses(model) -> list[str]:
    """Where DOUBLE appears: initializers, graph inputs/outputs/value_info, Cast targets, constants.

    Run it on a shape-inferred model so that intermediate values have types.
    """
    onnx = require("onnx")
    double = onnx.TensorProto.DOUBLE
    found = []
    for g in all_graphs(model.graph):
        found += [f"initializer {t.name}" for t in g.initializer if t.data_type == double]
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == double:
                found.append(f"value {vi.name}")
        for node in g.node:
            for attr in node.attribute:
                typed = node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                                         "RandomUniformLike", "Multinomial", "Bernoulli")
                if typed and attr.name in ("to", "dtype") and attr.i == double:
                    found.append(f"{node.op_type} node {node.name}")
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == double:
                    found.append(f"{node.op_type} node {node.name} ({attr.name})")
    return found


@dataclass(frozen=True)
class WeightRef:
    """Where a torch linear's weight lives in the graph.

    `out_in`: the initializer has the torch layout (out, in) (Gemm transB=1); otherwise it is the
    transposed (in, out) layout of MatMul. The GEMM reduction dimension is the torch input dim either way.
    """

    module: str
    initializer: str
    node: str
    op_type: str
    out_in: bool


def _module_of(node, prefix: str) -> str | None:
    """The torch module path of a node: dynamo's name-scope metadata, else legacy `/a/b.0/c/MatMul` names."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            modules = [s for s in scopes if isinstance(s, str) and s.startswith(prefix)]
            return modules[-1][len(prefix):] if modules else None
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        path = ".".join(parts)
        return path[len(prefix):] if path.startswith(prefix) else None
    return None


def linear_weights(model, prefix: str) -> dict[str, WeightRef]:
    """Map torch linear module paths to the initializer holding their weight in MatMul/Gemm nodes.

    The module comes from node metadata; the weight is the B input, followed back through Cast /
    Identity / Transpose producers to an initializer, and through a DequantizeLinear to its codes (a
    quantized layer: the initializer then holds the integer or float8 codes). `prefix` is the export
    wrapper's attribute (with a trailing dot). Modules used by several nodes keep the first.
    """
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found: dict[str, WeightRef] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        module = _module_of(node, prefix)
        if module is None or module in found:
            continue
        out_in = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        name = node.input[1]
        while name not in inits and name in producer and producer[name].op_type in ("Cast", "Identity", "Transpose",
                                                                                    "DequantizeLinear"):
            p = producer[name]
            if p.op_type == "Transpose":
                perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    break
                out_in = not out_in
            name = p.input[0]
        if name in inits:
            found[module] = WeightRef(module, name, node.name, node.op_type, out_in)
    return found


def _numpy_dtype(elem_type: int):
    onnx = require("onnx")
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "uint16"  # numpy has no bfloat16: read the bits, widen them in `read_initializer`
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def weight_bytes(model) -> int:
    """Bytes of the main graph's initializers, from their dims and types (no data is read)."""
    import numpy as np

    return sum(int(np.prod(t.dims, dtype=np.int64)) * np.dtype(_numpy_dtype(t.data_type)).itemsize
               for t in model.graph.initializer)


def read_initializer(tensor, base_dir: str | Path):
    """One initializer as a numpy array (bfloat16 widened to float32, exactly).

    External data is read from its file by offset and length, so only this tensor is in memory.
    """
    import numpy as np

    onnx = require("onnx")
    from onnx import numpy_helper

    dims = tuple(tensor.dims)
    packed = tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)  # two values per byte
    if packed and tensor.data_location == onnx.TensorProto.EXTERNAL:
        from onnx.external_data_helper import load_external_data_for_tensor

        tensor, stored = onnx.TensorProto(), tensor
        tensor.CopyFrom(stored)
        load_external_data_for_tensor(tensor, str(base_dir))
        tensor.data_location = onnx.TensorProto.DEFAULT
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        arr = numpy_helper.to_array(tensor)
        return arr.astype("float32") if tensor.data_type == onnx.TensorProto.BFLOAT16 else arr
    info = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(_numpy_dtype(tensor.data_type))
    count = int(np.prod(dims, dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize))
    if length != count * dtype.itemsize:
        raise ValueError(f"initializer {tensor.name}: {length} bytes of external data for {count} {dtype} values")
    arr = np.fromfile(Path(base_dir) / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if arr.size != count:
        raise ValueError(f"initializer {tensor.name}: {info['location']} ends after {arr.size} of {count} values")
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.reshape(dims)


def iter_initializers(model, names, base_dir: str | Path):
    """(name, array) of the named main-graph initializers, one at a time (see `read_initializer`)."""
    for t in model.graph.initializer:
        if t.name in names:
            yield t.name, read_initializer(t, base_dir)


def initializer_arrays(model, names: set[str], base_dir: str | Path) -> dict:
    """numpy arrays of the named initializers (bfloat16 as float32), reading external data from `base_dir`."""
    return dict(iter_initializers(model, names, base_dir))


def float_view(path: str | Path, from_type: int, view_path: str | Path) -> int:
    """Write `view_path`: the graph at `path` retyped from FLOAT16/BFLOAT16 to FLOAT without converting weights.

    Each `from_type` initializer of the main graph keeps its stored bytes (external data stays in the file
    `path` points at; embedded ones larger than 1 KiB move to `<view_path>.data`, tensor by tensor) and is
    widened by a Cast node in front of the graph. Values, inputs, outputs, Cast targets and constants are
    retyped as in `upcast_copy`. `view_path` must sit in the directory of `path` (the external data
    locations are relative to it). Run it with constant folding off, or the runtime materializes fp32
    copies of all weights. Returns the number of initializers cast.
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    path, view_path = Path(path), Path(view_path)
    if view_path.parent.resolve() != path.parent.resolve():
        raise ValueError(f"{view_path} must be in the directory of {path} (relative external data locations)")
    model = onnx.load(str(path), load_external_data=False)
    float32 = onnx.TensorProto.FLOAT
    data_name = view_path.name + ".data"
    taken = {t.name for t in model.graph.initializer}
    casts = []
    with open(view_path.parent / data_name, "wb") as data:
        for t in model.graph.initializer:
            if t.data_type != from_type:
                continue
            if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024:
                offset = data.tell()
                data.write(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)),
                                   ("length", str(data.tell() - offset))):
                    t.external_data.add(key=key, value=value)
            stored = f"{t.name}::stored"
            while stored in taken:
                stored += "_"
            casts.append(onnx.helper.make_node("Cast", [stored], [t.name], to=float32, name=f"{stored}::cast"))
            t.name = stored
    for i, node in enumerate(casts):
        model.graph.node.insert(i, node)

    def retype_small(t):
        if t.data_type == from_type:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))

    for g in all_graphs(model.graph):
        if g is not model.graph:
            for t in g.initializer:
                retype_small(t)
        _retype_values(g, from_type, retype_small)
    onnx.save_model(model, str(view_path))
    if not (view_path.parent / data_name).stat().st_size:
        (view_path.parent / data_name).unlink()
    return len(casts)


def _retype_values(g, from_type: int, retype_tensor) -> None:
    """Values, Cast/dtype attributes and tensor attributes of graph `g` from `from_type` to FLOAT."""
    onnx = require("onnx")
    float32 = onnx.TensorProto.FLOAT
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == from_type:
            vi.type.tensor_type.elem_type = float32
    for node in g.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == from_type:
                attr.i = float32
            elif attr.type == onnx.AttributeProto.TENSOR:
                retype_tensor(attr.t)


def upcast_copy(model, from_type: int):
    """A copy of a fully loaded model with every `from_type` (FLOAT16/BFLOAT16) tensor, value, constant and
    Cast target retyped to FLOAT: for checking a graph's structure and weights on a runtime that has no
    kernels for that type. Arithmetic then happens in fp32: it does not check half-precision numerics.
    In memory, so only for graphs under `EXTERNAL_COPY_BYTES`; larger ones take `float_view`."""
    onnx = require("onnx")
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy

    def retype_tensor(t):
        if t.data_type == from_type:
            arr = numpy_helper.to_array(t).astype("float32")
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    for g in all_graphs(model.graph):
        for t in g.initializer:
            retype_tensor(t)
        _retype_values(g, from_type, retype_tensor)
    return model
