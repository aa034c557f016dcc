"""Triton Inference Server model repositories from `obsdiff-export onnx` output directories.

    REPO/<component>/config.pbtxt
    REPO/<component>/1/model.onnx   (+ its external data file, same name as inside the graph)
    REPO/<component>/1/model.plan   (instead, for a TensorRT engine: `--engine component=PATH`, or
                                     `<component>.plan` + its sidecar next to the ONNX)

The configs are generated from the export sidecars (names, dtypes, dynamic dims, batch profile) and
validated before anything is written: by tritonclient's `ModelConfig` protobuf (Triton's own schema) when
tritonclient is installed, by the strict parser of the protobuf text format below otherwise; then by the
rules Triton enforces on load.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from obsdiff.errors import ConfigError, ModelLoadError, first_line
from obsdiff.runs.artifacts import check_json, read_json, sha256_file, staged_dir, write_json

TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
                "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
                "float32": "TYPE_FP32", "float64": "TYPE_FP64", "string": "TYPE_STRING"}
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "pytorch_libtorch", "tensorflow_savedmodel", "tensorflow_graphdef")
BATCH_DIM = "batch"
SIDECAR_KEYS = {"component": str, "file": str, "sha256": str, "inputs": list, "outputs": list}  # read below
REEXPORT = "re-export with obsdiff-export onnx"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ writing


def _sidecars(export_dir: Path) -> list[dict]:
    if not export_dir.is_dir():
        raise ModelLoadError(f"{export_dir} is not a directory; pass the --out of obsdiff-export onnx")
    found = []
    for path in sorted(export_dir.glob("*.json")):  # every JSON file here was written by obsdiff-export
        if path.name.endswith(".plan.json"):  # an engine sidecar: `_engine` reads it
            continue
        record = read_json(path, "export record", expect=(dict, list), fix=REEXPORT, error=ModelLoadError)
        if isinstance(record, dict) and record.get("artifact") == "onnx":
            found.append(check_json(record, path, "export sidecar", require=SIDECAR_KEYS, fix=REEXPORT,
                                    error=ModelLoadError))
    if not found:
        raise ModelLoadError(f"{export_dir} has no ONNX export sidecars (<component>.json); run obsdiff-export onnx "
                             "first")
    for record in found:
        onnx_file = export_dir / record["file"]
        if not onnx_file.is_file():
            raise ModelLoadError(f"{onnx_file} is missing although {record['component']}.json lists it; re-export")
        if sha256_file(onnx_file) != record["sha256"]:
            raise ModelLoadError(f"{onnx_file} does not match the hash in its sidecar: it changed after export; "
                                 "re-export")
        for name in record.get("external_data") or []:
            if not (export_dir / name).is_file():
                raise ModelLoadError(f"{export_dir / name} (external weights of {record['file']}) is missing; "
                                     "re-export")
    return found


def parse_engine_options(values) -> dict[str, Path]:
    """`--engine component=PATH` values -> {component: path}; one-line errors for malformed or repeated ones."""
    engines: dict[str, Path] = {}
    for value in values or ():
        component, sep, path = str(value).partition("=")
        if not sep or not component.strip() or not path.strip():
            raise ConfigError(f"--engine {value!r} is not COMPONENT=PATH; e.g. --engine transformer=transformer.plan")
        if component.strip() in engines:
            raise ConfigError(f"--engine names {component.strip()} twice; give one engine per component")
        engines[component.strip()] = Path(path.strip())
    return engines


def _engine(export_dir: Path, record: dict, plan: Path | None = None) -> tuple[Path, dict] | None:
    """The TensorRT engine of a component with its sidecar `<engine>.json`: `plan` when given (it must
    exist), else `<component>.plan` next to the ONNX when there is one."""
    given = plan is not None
    plan = plan if given else export_dir / f"{record['component']}.plan"
    side = plan.with_name(plan.name + ".json")
    if not plan.is_file():
        if given:
            raise ModelLoadError(f"engine {plan} (--engine {record['component']}=...) does not exist; build it with "
                                 "obsdiff-export build-engine")
        return None
    if not side.is_file():
        raise ModelLoadError(f"{plan} has no sidecar {side.name}; rebuild it with obsdiff-export build-engine")
    engine = read_json(side, "engine sidecar", fix="rebuild the engine with obsdiff-export build-engine --force",
                       error=ModelLoadError)
    onnx_sha = (engine.get("onnx") or {}).get("sha256") or engine.get("onnx_sha256")
    if onnx_sha and onnx_sha != record["sha256"]:
        raise ModelLoadError(f"{plan} was built from another ONNX file than {record['file']}; rebuild the engine")
    return plan, engine


def model_config(record: dict, platform: str = "onnxruntime_onnx", io_override: dict | None = None) -> dict:
    """The ModelConfig (as a dict) for one exported component.

    Batching: when every input and output starts with the `batch` dim, Triton batches
    (`max_batch_size` = the profile's max batch, dims without it, `dynamic_batching`); per-sample
    scalars like `timestep` become dims [1] reshaped to []. Otherwise (Flux's position ids have no
    batch dim) `max_batch_size` is 0 and dims are full shapes.
    """
    io_override = io_override or {}
    tensors = [*record["inputs"], *record["outputs"]]
    batched = all(t["shape"] and t["shape"][0] == BATCH_DIM for t in tensors)
    max_batch = int(record["dims"][BATCH_DIM]["max"]) if batched else 0

    def entry(t):
        dtype = io_override.get(t["name"], t["dtype"])
        if dtype not in TRITON_TYPES:
            raise ConfigError(f"{record['component']}: tensor {t['name']} has type {dtype}, which Triton cannot serve")
        dims = [d if isinstance(d, int) else -1 for d in (t["shape"][1:] if batched else t["shape"])]
        e = {"name": t["name"], "data_type": TRITON_TYPES[dtype], "dims": dims or [1]}
        if batched and not dims:
            e["reshape"] = {"shape": []}
        return e

    config = {"name": record["component"], "platform": platform, "max_batch_size": max_batch,
              "input": [entry(t) for t in record["inputs"]], "output": [entry(t) for t in record["outputs"]]}
    if batched:
        config["dynamic_batching"] = {}
    return config


def render_pbtxt(config: dict, comment: str = "") -> str:
    """ModelConfig dict -> protobuf text format, in the layout Triton's documentation uses."""

    def scalar(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return v if re.fullmatch(r"TYPE_[A-Z0-9]+|KIND_[A-Z]+", v) else json.dumps(v)
        return str(v)

    def block(msg: dict, indent: int) -> list[str]:
        pad = "  " * indent
        lines = []
        for key, value in msg.items():
            if isinstance(value, dict):
                inner = block(value, indent + 1)
                lines += [f"{pad}{key} {{", *inner, f"{pad}}}"] if inner else [f"{pad}{key} {{ }}"]
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                lines.append(f"{pad}{key} [")
                for i, item in enumerate(value):
                    sep = "," if i < len(value) - 1 else ""
                    lines += [f"{pad}  {{", *block(item, indent + 2), f"{pad}  }}{sep}"]
                lines.append(f"{pad}]")
            elif isinstance(value, list):
                lines.append(f"{pad}{key}: [ {', '.join(scalar(v) for v in value)} ]" if value else f"{pad}{key}: [ ]")
            else:
                lines.append(f"{pad}{key}: {scalar(value)}")
        return lines

    head = [f"# {line}" for line in comment.splitlines()] if comment else []
    return "\n".join([*head, *block(config, 0)]) + "\n"


def write_triton_repository(export_dir: str | Path, out: str | Path, force: bool = False,
                            engines: Mapping[str, str | Path] | None = None) -> list[dict]:
    """Write a Triton model repository for every exported component of `export_dir` (atomically).

    Returns the model configs written. ONNX files are served by the onnxruntime backend; a component with
    a TensorRT engine by the TensorRT backend instead: `engines` {component: engine path, from anywhere},
    else `<component>.plan` + `<component>.plan.json` in `export_dir`. An engine must have its sidecar and
    have been built from that component's ONNX file.
    """
    export_dir = Path(export_dir)
    records = _sidecars(export_dir)
    engines = {k: Path(v) for k, v in (engines or {}).items()}
    unknown = sorted(set(engines) - {r["component"] for r in records})
    if unknown:
        raise ConfigError(f"--engine names component {unknown[0]!r}, which {export_dir} does not have (it has "
                          f"{', '.join(r['component'] for r in records)})")
    written = []
    with staged_dir(out, force=force) as tmp:
        for record in records:
            engine = _engine(export_dir, record, engines.get(record["component"]))
            version = tmp / record["component"] / "1"
            version.mkdir(parents=True)
            if engine is None:
                config = model_config(record)
                shutil.copy2(export_dir / record["file"], version / "model.onnx")
                for name in record.get("external_data") or []:  # the graph refers to it by this name
                    shutil.copy2(export_dir / name, version / name)
                source = record["file"]
            else:
                plan, meta = engine
                override = {t["name"]: t["dtype"] for t in [*meta.get("inputs", []), *meta.get("outputs", [])]
                            if "name" in t and "dtype" in t}
                config = model_config(record, "tensorrt_plan", override)
                shutil.copy2(plan, version / "model.plan")
                source = plan.name
            text = render_pbtxt(config, comment=f"generated by obsdiff from {source} (sha256 {record['sha256'][:16]})")
            validator = check_pbtxt(text)
            (tmp / record["component"] / "config.pbtxt").write_text(text)
            # the export sidecar travels with the model: serving code reads profiles and notes from it
            write_json(tmp / record["component"] / "obsdiff-export.json",
                       record | {"triton": {"platform": config["platform"], "source_dir": str(export_dir.resolve()),
                                            "config_validated_by": validator}})
            written.append(config | {"validated_by": validator})
    return written


# ------------------------------------------------------------------------------------------ checking


def check_pbtxt(text: str) -> str:
    """Validate a config.pbtxt; returns which validator ran ("tritonclient" or "obsdiff").

    With tritonclient installed the text is parsed into Triton's own `ModelConfig` protobuf (every field and
    enum Triton knows, nothing else); otherwise by `parse_pbtxt`, the subset obsdiff writes. Either way the
    rules Triton enforces on load follow (`validate_model_config`). Raises `PbtxtError`.
    """
    parsed = parse_with_tritonclient(text)
    validator = "tritonclient"
    if parsed is None:
        parsed, validator = parse_pbtxt(text), "obsdiff"
    validate_model_config(parsed)
    return validator


def parse_with_tritonclient(text: str) -> dict | None:
    """The config as a dict through tritonclient's ModelConfig protobuf; None when tritonclient is missing."""
    try:
        from google.protobuf import json_format, text_format

        model_config_pb2 = importlib.import_module("tritonclient.grpc.model_config_pb2")
    except ImportError:
        log.debug("tritonclient is not installed; config.pbtxt is checked by obsdiff's parser")
        return None
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise PbtxtError(f"config.pbtxt: {first_line(exc)} (tritonclient's ModelConfig)") from None
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    # int64 fields arrive as strings in the JSON mapping; the rules compare numbers
    config["max_batch_size"] = int(config.get("max_batch_size", 0))
    for kind in ("input", "output"):
        for tensor in config.get(kind, []):
            tensor["dims"] = [int(d) for d in tensor.get("dims", [])]
    return config


# ------------------------------------------------------------------------------------------ parsing

_TOKEN = re.compile(r"""\s*(?:(\#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)
                        |([{}\[\]:,;<>]))""", re.X)

# The part of Triton's ModelConfig schema obsdiff writes or users commonly add: field -> type, where a
# type is a message name, "str", "int", "bool", "float", or ("enum", values); a leading "*" means repeated.
_ENUM_TYPES = ("enum", tuple(TRITON_TYPES.values()) + ("TYPE_INVALID",))
_SCHEMA: dict[str, dict] = {
    "ModelConfig": {"name": "str", "platform": "str", "backend": "str", "max_batch_size": "int",
                    "input": "*ModelInput", "output": "*ModelOutput", "dynamic_batching": "DynamicBatching",
                    "instance_group": "*InstanceGroup", "default_model_filename": "str",
                    "version_policy": "VersionPolicy", "parameters": "*Parameter",
                    "optimization": "Optimization"},
    "ModelInput": {"name": "str", "data_type": _ENUM_TYPES, "dims": "*int", "reshape": "Reshape",
                   "optional": "bool", "allow_ragged_batch": "bool", "is_shape_tensor": "bool",
                   "format": ("enum", ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"))},
    "ModelOutput": {"name": "str", "data_type": _ENUM_TYPES, "dims": "*int", "reshape": "Reshape",
                    "label_filename": "str", "is_shape_tensor": "bool"},
    "Reshape": {"shape": "*int"},
    "DynamicBatching": {"preferred_batch_size": "*int", "max_queue_delay_microseconds": "int",
                        "preserve_ordering": "bool"},
    "InstanceGroup": {"name": "str", "kind": ("enum", ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")),
                      "count": "int", "gpus": "*int"},
    "VersionPolicy": {"latest": "Latest", "all": "All", "specific": "Specific"},
    "Latest": {"num_versions": "int"},
    "All": {},
    "Specific": {"versions": "*int"},
    "Parameter": {"key": "str", "value": "ParameterValue"},
    "ParameterValue": {"string_value": "str"},
    "Optimization": {"cuda": "Cuda", "priority": ("enum", ("PRIORITY_DEFAULT", "PRIORITY_MAX", "PRIORITY_MIN"))},
    "Cuda": {"graphs": "bool", "busy_wait_events": "bool"},
}


class PbtxtError(ConfigError):
    """A config.pbtxt that Triton would reject (syntax, unknown field, wrong type)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PbtxtError(f"config.pbtxt: unexpected character {text[pos:].lstrip()[:1]!r} at offset {pos}")
        pos = m.end()
        comment, string, number, ident, punct = m.groups()
        if comment:
            continue
        if string is not None:
            out.append(("str", json.loads(string)))
        elif number is not None:
            out.append(("num", number))
        elif ident is not None:
            out.append(("ident", ident))
        else:
            out.append(("punct", punct))
    return out


def parse_pbtxt(text: str, message: str = "ModelConfig") -> dict:
    """Parse protobuf text format strictly against the ModelConfig subset above.

    Every field must be known for its message, scalars must have their declared type, enums a known
    value, braces and brackets must balance. Repeated fields become lists. Raises `PbtxtError`.
    """
    toks = _tokens(text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else ("eof", "")

    def take(kind=None, value=None):
        nonlocal pos
        tok = peek()
        if tok[0] == "eof" or (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind or "a token"
            raise PbtxtError(f"config.pbtxt: expected {want!r}, found {tok[1] or 'end of file'!r}")
        pos += 1
        return tok

    def scalar(ftype, field):
        kind, value = take()
        if isinstance(ftype, tuple):
            if kind != "ident" or value not in ftype[1]:
                raise PbtxtError(f"config.pbtxt: {field} = {value!r} is not one of {', '.join(ftype[1][:6])}, ...")
            return value
        if ftype == "str":
            if kind != "str":
                raise PbtxtError(f"config.pbtxt: {field} needs a quoted string, got {value!r}")
            return value
        if ftype == "int":
            if kind != "num" or not re.fullmatch(r"-?\d+", value):
                raise PbtxtError(f"config.pbtxt: {field} needs an integer, got {value!r}")
            return int(value)
        if ftype == "float":
            if kind != "num":
                raise PbtxtError(f"config.pbtxt: {field} needs a number, got {value!r}")
            return float(value)
        if ftype == "bool":
            if value not in ("true", "false", "True", "False", "1", "0"):
                raise PbtxtError(f"config.pbtxt: {field} needs true or false, got {value!r}")
            return value in ("true", "True", "1")
        raise PbtxtError(f"config.pbtxt: bad schema type {ftype!r}")

    def value_of(ftype, field):
        if isinstance(ftype, str) and ftype in _SCHEMA:
            close = {"{": "}", "<": ">"}[take("punct")[1]] if peek()[1] in ("{", "<") else None
            if close is None:
                raise PbtxtError(f"config.pbtxt: {field} is a message and needs {{ ... }}")
            msg = body(ftype, close)
            take("punct", close)
            return msg
        return scalar(ftype, field)

    def body(msg_name, close):
        schema = _SCHEMA[msg_name]
        msg: dict = {}
        while peek()[0] != "eof" and peek()[1] != close:
            if peek()[0] == "punct" and peek()[1] in "}]>":
                raise PbtxtError(f"config.pbtxt: unbalanced {peek()[1]!r}")
            _, field = take("ident")
            if field not in schema:
                raise PbtxtError(f"config.pbtxt: unknown field {field!r} in {msg_name}")
            spec = schema[field]
            repeated = isinstance(spec, str) and spec.startswith("*")
            ftype = spec[1:] if repeated else spec
            if peek()[1] == ":":
                take("punct", ":")
            elif not (isinstance(ftype, str) and ftype in _SCHEMA):
                raise PbtxtError(f"config.pbtxt: expected ':' after {field}")
            if peek()[1] == "[":
                if not repeated:
                    raise PbtxtError(f"config.pbtxt: {field} is not a repeated field but has a list")
                take("punct", "[")
                items = []
                while peek()[1] != "]":
                    items.append(value_of(ftype, field))
                    if peek()[1] == ",":
                        take("punct", ",")
                    elif peek()[1] != "]":
                        raise PbtxtError(f"config.pbtxt: expected ',' or ']' in {field}, found {peek()[1]!r}")
                take("punct", "]")
                msg.setdefault(field, []).extend(items)
            else:
                value = value_of(ftype, field)
                if repeated:
                    msg.setdefault(field, []).append(value)
                elif field in msg:
                    raise PbtxtError(f"config.pbtxt: {field} is given twice in {msg_name}")
                else:
                    msg[field] = value
            if peek()[1] in (",", ";"):
                take("punct")
        return msg

    result = body(message, close=None)
    if peek()[0] != "eof":
        raise PbtxtError(f"config.pbtxt: unbalanced {peek()[1]!r}")
    return result


def validate_model_config(config: dict) -> None:
    """Semantic rules Triton enforces on load, for a parsed ModelConfig."""
    name = config.get("name")
    if not name:
        raise PbtxtError("config.pbtxt: name is required")
    if config.get("platform") not in PLATFORMS and not config.get("backend"):
        raise PbtxtError(f"config.pbtxt: platform {config.get('platform')!r} is not one of {', '.join(PLATFORMS)}")
    max_batch = config.get("max_batch_size", 0)
    if max_batch < 0:
        raise PbtxtError(f"config.pbtxt: max_batch_size {max_batch} is negative")
    if "dynamic_batching" in config and max_batch == 0:
        raise PbtxtError("config.pbtxt: dynamic_batching needs max_batch_size > 0")
    for kind in ("input", "output"):
        tensors = config.get(kind, [])
        if not tensors:
            raise PbtxtError(f"config.pbtxt: {name} has no {kind}")
        seen = set()
        for t in tensors:
            for req in ("name", "data_type", "dims"):
                if req not in t:
                    raise PbtxtError(f"config.pbtxt: {kind} {t.get('name', '?')} lacks {req}")
            if t["name"] in seen:
                raise PbtxtError(f"config.pbtxt: {kind} {t['name']} is listed twice")
            seen.add(t["name"])
            if any(d == 0 or d < -1 for d in t["dims"]):
                raise PbtxtError(f"config.pbtxt: {kind} {t['name']} has invalid dims {t['dims']} (use -1 for dynamic)")
            if not t["dims"]:
                raise PbtxtError(f"config.pbtxt: {kind} {t['name']} needs at least one dim (use [1] + reshape)")
