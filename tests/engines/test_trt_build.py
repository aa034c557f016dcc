"""The build sequence of `build_engine` end to end with TensorRT and the GPU replaced by stand-ins.

Polygraphy's logger, `Profile`, the staged outputs, the flag rules, the trtexec line, the Q/DQ detection (on real
ONNX files) and the sidecar are the real ones; only what needs TensorRT (parsing, building, the engine) is a stand-in
that records what it was asked. The real build runs in test_trt.py where TensorRT and a GPU exist.
"""

import json
from types import SimpleNamespace

import pytest

from obsdiff.engines import engine_record as ER
from obsdiff.engines import trt as T
from obsdiff.engines import trt_env
from tests.engines.test_trt import COUNT_LOG, TRT10_BUILDER, TRT10_NETWORK, enum, tiny_onnx, trt_ns

GPU = {"name": "NVIDIA H200", "compute_capability": "9.0"}
LOG_LINES = ["(Sparsity) Layers eligible for sparse math: gemm_q, gemm_ff",
             "(Sparsity) TRT inference plan picked sparse implementation for layers: gemm_ff"]


class FakeEngine:
    io = [("hidden_states", "INPUT", "HALF"), ("timestep", "INPUT", "FLOAT"), ("latent", "OUTPUT", "HALF")]
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(mode for n, mode, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=next(d for n, _, d in self.io if n == name))

    def create_engine_inspector(self):
        layers = [{"Name": "gemm_ff", "HasSparseWeights": 1}, {"Name": "gemm_q", "HasSparseWeights": 0}]
        return SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": layers}))


def fake_polygraphy(calls: dict, fail_parse: bool = False, log_lines=tuple(LOG_LINES)):
    from polygraphy.backend.trt import Profile
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    inputs = [SimpleNamespace(name="hidden_states", shape=(-1, 16, -1, -1), dtype=SimpleNamespace(name="HALF")),
              SimpleNamespace(name="timestep", shape=(-1,), dtype=SimpleNamespace(name="FLOAT"))]
    network = SimpleNamespace(num_inputs=2, get_input=lambda i: inputs[i])

    def network_from_onnx_path(path, strongly_typed=False):
        calls["parse"] = {"path": path, "strongly_typed": strongly_typed}
        if fail_parse:
            G_LOGGER.error("In node 12 (parseGraph): INVALID_NODE: Invalid Node - /attn/Einsum")
            G_LOGGER.critical("Could not parse ONNX correctly")  # raises PolygraphyException, as Polygraphy does
        return "builder", network, "parser"

    def engine_from_network(net, config, save_timing_cache=None):
        calls["build"] = {"network": net, "config": config, "save_timing_cache": save_timing_cache}
        for line in log_lines:  # TensorRT's INFO lines reach Polygraphy's logger at VERBOSE
            G_LOGGER.verbose(line)
        return FakeEngine()

    def save_engine(engine, path):
        calls["saved_to"] = path
        with open(path, "wb") as f:
            f.write(b"serialized engine")

    assert PolygraphyException  # the error type the builder turns into one line
    return SimpleNamespace(
        network_from_onnx_path=network_from_onnx_path, engine_from_network=engine_from_network,
        save_engine=save_engine, Profile=Profile,
        CreateConfig=lambda **kw: calls.setdefault("create_config", kw) and ("CreateConfig", kw),
        PostprocessConfig=lambda create, func: calls.setdefault("postprocess", func) and ("Postprocess", create))


@pytest.fixture
def onnx_model(onnx_with_sidecar):
    """`onnx_with_sidecar` with a real (tiny) ONNX graph, plain or with Q/DQ nodes, in place of its stand-in bytes:
    the builder reads the graph for Q/DQ nodes."""
    import onnx

    def make(quant=None, **kw):
        path = onnx_with_sidecar(**kw)
        onnx.save(tiny_onnx(quant), str(path))
        return path

    return make


@pytest.fixture
def fake_tensorrt(monkeypatch):
    trt = trt_ns(TRT10_BUILDER, TRT10_NETWORK)
    trt.__version__ = "10.8.0.43"
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.LayerInformationFormat = enum("ONELINE", "JSON")
    calls = {}
    monkeypatch.setattr(trt_env, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_env, "require_cuda_gpu", lambda: dict(GPU))
    monkeypatch.setattr(trt_env, "require_polygraphy_trt", lambda: fake_polygraphy(calls))
    return SimpleNamespace(trt=trt, calls=calls, monkeypatch=monkeypatch)


def test_build_runs_the_steps_and_writes_engine_sidecar_log(fake_tensorrt, onnx_model, tmp_path):
    onnx = onnx_model()  # fp16, 2:4 run, SD3 profile
    out = tmp_path / "engines" / "transformer.plan"
    cache = tmp_path / "timing.cache"
    record = T.build_engine(onnx, out, T.EngineConfig(timing_cache=cache, strict_nans=True, opt_level=4))
    calls, trt = fake_tensorrt.calls, fake_tensorrt.trt

    assert calls["parse"] == {"path": str(onnx), "strongly_typed": False}  # TensorRT 10: weakly typed
    kwargs = calls["create_config"]
    assert kwargs["fp16"] and kwargs["tf32"] and kwargs["sparse_weights"] and "bf16" not in kwargs
    assert kwargs["builder_optimization_level"] == 4 and kwargs["load_timing_cache"] == str(cache)
    assert kwargs["memory_pool_limits"] == {trt.MemoryPoolType.WORKSPACE: 8 * 2**30}
    (profile,) = kwargs["profiles"]
    assert tuple(profile["hidden_states"].max) == (8, 16, 192, 192)
    assert calls["build"]["save_timing_cache"] == str(cache) and calls["build"]["network"][0] == "builder"
    set_on_config = []
    calls["postprocess"](None, None, SimpleNamespace(set_flag=set_on_config.append))
    assert set_on_config == [trt.BuilderFlag.STRICT_NANS]  # no CreateConfig argument for it

    assert out.read_bytes() == b"serialized engine" and not list(out.parent.glob("*.tmp*"))
    sidecar = json.loads(ER.engine_sidecar_path(out).read_text())
    assert sidecar == json.loads(json.dumps(record)) and sidecar["bytes"] == len(b"serialized engine")
    assert sidecar["sparse"]["picked"] == ["gemm_ff"] and sidecar["sparse"]["eligible_count"] == 2
    assert sidecar["sparse"]["inspector_sparse_layers"] == ["gemm_ff"]
    assert sidecar["inputs"] == [{"name": "hidden_states", "dtype": "float16"},
                                 {"name": "timestep", "dtype": "float32"}]
    assert sidecar["outputs"] == [{"name": "latent", "dtype": "float16"}]
    assert sidecar["builder"] == "polygraphy" and sidecar["builder_flags"] == ["TF32", "FP16", "SPARSE_WEIGHTS",
                                                                                "STRICT_NANS"]
    assert sidecar["trtexec"].startswith(f"trtexec --onnx={onnx} --saveEngine={out} --fp16 --sparsity=enable "
                                         "--minShapes=hidden_states:1x16x64x64,")
    assert f"--timingCacheFile={cache}" in sidecar["trtexec"]
    assert sidecar["trtexec"].endswith("STRICT_NANS (no trtexec option)")
    assert sidecar["quantization"]["qdq"] is False and sidecar["format"] == T.FORMAT_VERSION
    log_text = (out.parent / "transformer.plan.log").read_text()
    assert "picked sparse implementation for layers: gemm_ff" in log_text
    env = {"tensorrt": "10.8.0.43", "gpu": GPU["name"], "compute_capability": "9.0"}
    assert ER.check_engine(out, environment=env)["file"] == "transformer.plan"


def test_dense_twin_is_built_without_sparse_weights(fake_tensorrt, onnx_model, tmp_path):
    out = tmp_path / "t.plan"
    record = T.build_engine(onnx_model(), out, T.EngineConfig(also_dense=True))
    assert record["sparse"]["requested"] and record["dense_twin"]["sparse"]["requested"] is False
    assert "--sparsity=enable" not in record["dense_twin"]["trtexec"]
    assert (tmp_path / "t.dense.plan").read_bytes() == b"serialized engine"
    assert json.loads(ER.engine_sidecar_path(out).read_text())["dense_twin"]["file"] == "t.dense.plan"


def test_a_parser_failure_is_one_line_naming_tensorrts_error(fake_tensorrt, onnx_model, tmp_path):
    fake_tensorrt.monkeypatch.setattr(trt_env, "require_polygraphy_trt",
                                      lambda: fake_polygraphy(fake_tensorrt.calls, fail_parse=True))
    with pytest.raises(ER.EngineError) as err:
        T.build_engine(onnx_model(), tmp_path / "t.plan")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("TensorRT could not parse transformer.onnx: ")
    assert "INVALID_NODE: Invalid Node - /attn/Einsum" in msg and "-vv" in msg
    assert not list(tmp_path.glob("t.plan*"))


def test_build_engine_command_prints_the_trtexec_line_or_the_sidecar_as_json(fake_tensorrt, onnx_model, tmp_path):
    from click.testing import CliRunner

    from obsdiff.engines.cli import cli

    onnx = onnx_model()
    r = CliRunner().invoke(cli, ["build-engine", str(onnx), "--out", str(tmp_path / "a.plan")])
    assert r.exit_code == 0, r.output
    assert "a.plan: TensorRT 10.8.0.43, NVIDIA H200, weakly typed, flags TF32, FP16, SPARSE_WEIGHTS" in r.stdout
    assert "sparse: 1 of 2 eligible layers picked a sparse kernel" in r.stdout
    assert f"the same build with trtexec: trtexec --onnx={onnx} --saveEngine={tmp_path / 'a.plan'} --fp16" in r.stdout
    r = CliRunner().invoke(cli, ["build-engine", str(onnx), "--out", str(tmp_path / "b.plan"), "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record == json.loads((tmp_path / "b.plan.json").read_text()) and record["file"] == "b.plan"


def test_build_takes_the_profile_and_its_reason_from_a_real_export_sidecar(fake_tensorrt, tiny_onnx_dir, tmp_path):
    """The export's default ranges (TensorRT diffusion demo's, narrowed to the tiny model) reach the build."""
    onnx = tiny_onnx_dir / "transformer.onnx"
    exported = json.loads(onnx.with_suffix(".json").read_text())
    record = T.build_engine(onnx, tmp_path / "t.plan")
    (profile,) = fake_tensorrt.calls["create_config"]["profiles"]
    hidden = next(i["profile"] for i in exported["inputs"] if i["name"] == "hidden_states")
    assert hidden == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 32, 32]}  # latent 8:8:32, given batch
    assert [list(getattr(profile["hidden_states"], k)) for k in ("min", "opt", "max")] == list(hidden.values())
    assert record["profiles"]["hidden_states"] == hidden
    assert record["profile_source"].startswith("export sidecar transformer.json (TensorRT diffusion demo default "
                                               "for SD3-Medium")
    explicit = T.EngineConfig(opt_shapes={"hidden_states": (1, 4, 8, 8), "timestep": (1,)})
    assert T.profile_source(None, explicit).startswith("explicit shapes")


def test_a_qdq_onnx_builds_strongly_typed_with_sparse_weights_and_its_trtexec_line(fake_tensorrt, onnx_model,
                                                                                   tmp_path):
    """TensorRT 10 with precision flags: the Q/DQ graph still builds strongly typed, only SPARSE_WEIGHTS set."""
    fake_tensorrt.monkeypatch.setattr(trt_env, "require_polygraphy_trt",
                                      lambda: fake_polygraphy(fake_tensorrt.calls, log_lines=COUNT_LOG))
    onnx = onnx_model("int8")  # an fp16 export of a 2:4 run, with INT8 Q/DQ
    out = tmp_path / "q.plan"
    record = T.build_engine(onnx, out, T.EngineConfig(sparse_weights=True))
    calls = fake_tensorrt.calls
    assert calls["parse"] == {"path": str(onnx), "strongly_typed": True}
    kwargs = calls["create_config"]
    assert kwargs["sparse_weights"] is True and not {"fp16", "bf16", "tf32", "int8", "fp8"} & set(kwargs)
    assert "postprocess" not in calls  # no flag set behind CreateConfig's back either
    assert record["typing"] == "strong" and record["network_flags"] == ["STRONGLY_TYPED"]
    assert record["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert record["quantization"] == {"qdq": True, "quantize_linear": 1, "dequantize_linear": 2, "types": ["int8"],
                                      "custom_ops": {}}
    assert record["trtexec"].startswith(f"trtexec --onnx={onnx} --saveEngine={out} --stronglyTyped "
                                        "--sparsity=enable --minShapes=hidden_states:1x16x64x64,")
    assert not {"--fp16", "--int8", "--bf16", "--noTF32"} & set(record["trtexec"].split())
    assert (record["sparse"]["eligible_count"], record["sparse"]["picked_count"]) == (39, 0)
    assert json.loads(ER.engine_sidecar_path(out).read_text())["trtexec"] == record["trtexec"]


def test_qdq_build_from_the_command_line_and_weak_typing_refused(fake_tensorrt, onnx_model, tmp_path):
    from click.testing import CliRunner

    from obsdiff.engines.cli import cli

    onnx = onnx_model("fp8", name="fp8")
    r = CliRunner().invoke(cli, ["build-engine", str(onnx), "--out", str(tmp_path / "a.plan")])
    assert r.exit_code == 0, r.output
    assert "strongly typed, flags SPARSE_WEIGHTS" in r.stdout and "sparse: 1 of 2 eligible layers" in r.stdout
    assert "Q/DQ graph (float8e4m3fn; 1 QuantizeLinear, 1 DequantizeLinear): strongly typed" in r.stdout
    assert "--stronglyTyped --sparsity=enable" in r.stdout
    r = CliRunner().invoke(cli, ["build-engine", str(onnx), "--out", str(tmp_path / "b.plan"), "--weakly-typed"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "drop --weakly-typed" in r.output
    assert not (tmp_path / "b.plan").exists()


def test_a_plain_onnx_can_be_asked_for_strong_typing_on_tensorrt10(fake_tensorrt, onnx_model, tmp_path):
    record = T.build_engine(onnx_model(), tmp_path / "s.plan", T.EngineConfig(strongly_typed=True))
    assert fake_tensorrt.calls["parse"]["strongly_typed"] and record["builder_flags"] == ["SPARSE_WEIGHTS"]
    assert "--stronglyTyped --sparsity=enable" in record["trtexec"] and "--fp16" not in record["trtexec"]
