"""Triton model repositories from export directories, and the strict config.pbtxt parser."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from obsdiff.errors import ConfigError, ModelLoadError
from obsdiff.export.cli import cli
from obsdiff.export.config import ExportConfig
from obsdiff.export.onnx_export import export_onnx
from obsdiff.export.triton import (
    PbtxtError,
    check_pbtxt,
    model_config,
    parse_engine_options,
    parse_pbtxt,
    render_pbtxt,
    validate_model_config,
    write_triton_repository,
)

NO_TRITONCLIENT = {"tritonclient.grpc.model_config_pb2": None}  # sys.modules entries: the import then fails


@pytest.fixture(scope="module")
def sd3_export(tiny_sd3_dir, tmp_path_factory):
    """All components of the tiny SD3 pipeline (transformer in fp16), legacy exporter (fast), weights external."""
    out = tmp_path_factory.mktemp("triton") / "onnx"
    export_onnx(str(tiny_sd3_dir), out, ExportConfig(component="all", dtype="fp32",
                                                     component_dtypes=(("transformer", "fp16"),),
                                                     exporter="legacy", external_data=True, text_len=(8, 16, 32),
                                                     batch=(1, 2, 4)))
    return out


def test_repository_layout_and_configs(sd3_export, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(cli, ["triton", str(sd3_export), "--out", str(repo)])
    assert r.exit_code == 0, r.output
    models = sorted(p.name for p in repo.iterdir())
    assert models == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"]
    t = repo / "transformer"
    assert (t / "1" / "model.onnx").is_file() and (t / "1" / "transformer.onnx.data").is_file()
    text = (t / "config.pbtxt").read_text()
    config = parse_pbtxt(text)
    validate_model_config(config)
    assert config["name"] == "transformer" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 4 and config["dynamic_batching"] == {}
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["hidden_states"] == {"name": "hidden_states", "data_type": "TYPE_FP16", "dims": [4, -1, -1]}
    assert inputs["timestep"] == {"name": "timestep", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}}
    assert config["output"] == [{"name": "latent", "data_type": "TYPE_FP16", "dims": [4, -1, -1]}]
    vae = parse_pbtxt((repo / "vae_decoder" / "config.pbtxt").read_text())
    assert vae["input"][0]["data_type"] == "TYPE_FP32"
    ids = parse_pbtxt((repo / "text_encoder" / "config.pbtxt").read_text())["input"][0]
    assert ids == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [8]}
    sidecar = json.loads((t / "obsdiff-export.json").read_text())
    assert sidecar["triton"]["platform"] == "onnxruntime_onnx" and sidecar["component"] == "transformer"
    assert sidecar["triton"]["config_validated_by"] == "tritonclient" and "checked by tritonclient" in r.output
    # the written repository is refused as an output without --force, then replaced with it
    again = CliRunner().invoke(cli, ["triton", str(sd3_export), "--out", str(repo)])
    assert again.exit_code == 2 and "--force" in again.output
    assert CliRunner().invoke(cli, ["triton", str(sd3_export), "--out", str(repo), "--force"]).exit_code == 0


def test_configs_parse_as_triton_model_config(sd3_export, tmp_path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    for config in write_triton_repository(sd3_export, tmp_path / "repo"):
        parsed = text_format.Parse((tmp_path / "repo" / config["name"] / "config.pbtxt").read_text(), pb.ModelConfig())
        assert parsed.name == config["name"] and parsed.max_batch_size == config["max_batch_size"]
        assert [i.name for i in parsed.input] == [i["name"] for i in config["input"]]
        assert pb.DataType.Name(parsed.input[0].data_type) == config["input"][0]["data_type"]
        assert parsed.HasField("dynamic_batching")


def test_without_tritonclient_the_configs_are_checked_by_obsdiffs_parser(sd3_export, tmp_path, monkeypatch):
    for name, module in NO_TRITONCLIENT.items():
        monkeypatch.setitem(sys.modules, name, module)
    configs = write_triton_repository(sd3_export, tmp_path / "repo")
    assert {c["validated_by"] for c in configs} == {"obsdiff"} and len(configs) == 5
    sidecar = json.loads((tmp_path / "repo" / "transformer" / "obsdiff-export.json").read_text())
    assert sidecar["triton"]["config_validated_by"] == "obsdiff"


@pytest.mark.parametrize("tritonclient", [True, False], ids=["tritonclient", "fallback"])
@pytest.mark.parametrize("edit, protobuf_message, parser_message", [
    (lambda t: t.replace("max_batch_size: 4", "max_batch: 4"), 'no field named "max_batch"', "unknown field"),
    (lambda t: t.replace("TYPE_FP16", "TYPE_HALF"), "TYPE_HALF", "TYPE_HALF"),
    (lambda t: t.replace("dims: [ 4, -1 ]", "dims: [ 4, 0 ]"), "invalid dims", "invalid dims"),
])
def test_bad_configs_are_refused_by_either_validator(tritonclient, edit, protobuf_message, parser_message,
                                                     monkeypatch):
    if not tritonclient:
        for name, module in NO_TRITONCLIENT.items():
            monkeypatch.setitem(sys.modules, name, module)
    assert check_pbtxt(GOOD) == ("tritonclient" if tritonclient else "obsdiff")
    with pytest.raises(PbtxtError, match=protobuf_message if tritonclient else parser_message):
        check_pbtxt(edit(GOOD))


def test_engine_options_are_component_equals_path():
    assert parse_engine_options(["transformer=/e/t.plan", " vae_decoder = v.plan "]) == {
        "transformer": Path("/e/t.plan"), "vae_decoder": Path("v.plan")}
    with pytest.raises(ConfigError, match="'transformer' is not COMPONENT=PATH"):
        parse_engine_options(["transformer"])
    with pytest.raises(ConfigError, match="names transformer twice"):
        parse_engine_options(["transformer=a.plan", "transformer=b.plan"])


def test_engine_from_anywhere_serves_its_component(sd3_export, tmp_path):
    record = json.loads((sd3_export / "transformer.json").read_text())
    elsewhere = tmp_path / "engines" / "h200"
    elsewhere.mkdir(parents=True)
    plan = elsewhere / "sd3-24.plan"
    plan.write_bytes(b"engine built elsewhere")
    engine_sidecar = {"onnx": {"sha256": record["sha256"]}, "inputs": [{"name": "hidden_states", "dtype": "float16"}]}
    (elsewhere / "sd3-24.plan.json").write_text(json.dumps(engine_sidecar))
    repo = tmp_path / "repo"
    r = CliRunner().invoke(cli, ["triton", str(sd3_export), "--out", str(repo), "--engine", f"transformer={plan}"])
    assert r.exit_code == 0, r.output
    assert "transformer: tensorrt_plan" in r.output and "vae_decoder: onnxruntime_onnx" in r.output
    assert (repo / "transformer" / "1" / "model.plan").read_bytes() == b"engine built elsewhere"
    assert not (repo / "transformer" / "1" / "model.onnx").exists()
    assert parse_pbtxt((repo / "transformer" / "config.pbtxt").read_text())["platform"] == "tensorrt_plan"


@pytest.mark.parametrize("engine, message", [
    ("unet={plan}", "component 'unet', which .* does not have .*transformer"),
    ("transformer={missing}", "engine .*missing.plan .*does not exist"),
    ("transformer={orphan}", "has no sidecar orphan.plan.json"),
    ("transformer", "is not COMPONENT=PATH"),
])
def test_bad_engine_options_are_one_line_errors(sd3_export, tmp_path, engine, message):
    (tmp_path / "orphan.plan").write_bytes(b"engine")
    value = engine.format(plan=tmp_path / "orphan.plan", missing=tmp_path / "missing.plan",
                          orphan=tmp_path / "orphan.plan")
    r = CliRunner().invoke(cli, ["triton", str(sd3_export), "--out", str(tmp_path / "repo"), "--engine", value])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "repo").exists()


def test_tensor_without_batch_dim_disables_batching(flux_export):
    record = json.loads((flux_export / "transformer.json").read_text())
    config = model_config(record)
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    ids = {i["name"]: i for i in config["input"]}["img_ids"]
    assert ids["dims"] == [-1, 3] and {i["name"]: i for i in config["input"]}["hidden_states"]["dims"] == [-1, -1, 64]
    validate_model_config(parse_pbtxt(render_pbtxt(config)))


def test_engine_with_sidecar_is_served_by_tensorrt(sd3_export, tmp_path):
    export = tmp_path / "onnx"
    shutil.copytree(sd3_export, export)
    record = json.loads((export / "transformer.json").read_text())
    (export / "transformer.plan").write_bytes(b"engine")

    with pytest.raises(ModelLoadError, match="has no sidecar transformer.plan.json"):
        write_triton_repository(export, tmp_path / "r0")
    (export / "transformer.plan.json").write_text(json.dumps({"onnx": {"sha256": "0" * 64}}))
    with pytest.raises(ModelLoadError, match="built from another ONNX file"):
        write_triton_repository(export, tmp_path / "r1")
    (export / "transformer.plan.json").write_text(json.dumps({"onnx": {"sha256": record["sha256"]}}))
    configs = {c["name"]: c for c in write_triton_repository(export, tmp_path / "r2")}
    assert configs["transformer"]["platform"] == "tensorrt_plan"
    assert configs["vae_decoder"]["platform"] == "onnxruntime_onnx"
    assert (tmp_path / "r2" / "transformer" / "1" / "model.plan").read_bytes() == b"engine"
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()


def test_changed_onnx_file_is_refused(sd3_export, tmp_path):
    export = tmp_path / "onnx"
    shutil.copytree(sd3_export, export)
    with open(export / "vae_decoder.onnx", "ab") as f:
        f.write(b"\0")

    with pytest.raises(ModelLoadError, match="does not match the hash in its sidecar"):
        write_triton_repository(export, tmp_path / "repo")


GOOD = '''
# comment
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "x", data_type: TYPE_FP16, dims: [ 4, -1 ] } ]
output [
  { name: "y" data_type: TYPE_FP32 dims: [ -1 ] reshape { shape: [ ] } }
]
dynamic_batching { preferred_batch_size: [ 2, 4 ] }
instance_group [ { kind: KIND_GPU count: 1 } ]
'''


def test_parser_accepts_the_documented_syntax():
    config = parse_pbtxt(GOOD)
    validate_model_config(config)
    assert config["input"][0]["dims"] == [4, -1] and config["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("max_batch_size: 4", "max_batch: 4"), "unknown field 'max_batch'"),
    (lambda t: t.replace("TYPE_FP16", "TYPE_HALF"), "TYPE_HALF"),
    (lambda t: t.replace('name: "m"', "name: m"), "needs a quoted string"),
    (lambda t: t.replace("max_batch_size: 4", 'max_batch_size: "4"'), "needs an integer"),
    (lambda t: t.replace("dynamic_batching { preferred", "dynamic_batching { { preferred"), "expected"),
    (lambda t: t + "}", "unbalanced"),
    (lambda t: t.rstrip()[:-1], "expected"),
    (lambda t: t.replace('name: "m"', 'name: "m"\nname: "n"'), "given twice"),
])
def test_parser_rejects_bad_configs(edit, message):
    with pytest.raises(PbtxtError, match=message):
        parse_pbtxt(edit(GOOD))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("max_batch_size: 4", "max_batch_size: 0"), "dynamic_batching needs max_batch_size > 0"),
    (lambda t: t.replace("dims: [ 4, -1 ]", "dims: [ 4, 0 ]"), "invalid dims"),
    (lambda t: t.replace('"onnxruntime_onnx"', '"onnx"'), "platform 'onnx'"),
    (lambda t: t.replace('name: "y"', 'name: "x"').replace("output [", "input ["), "listed twice"),
])
def test_validation_rejects_what_triton_rejects(edit, message):
    with pytest.raises(PbtxtError, match=message):
        validate_model_config(parse_pbtxt(edit(GOOD)))
