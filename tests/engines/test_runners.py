"""Every backend available on CPU gives the PyTorch output; the others say why they cannot run."""

import pytest
import torch

from obsdiff.engines import runners as R
from obsdiff.engines.runner_base import RunnerUnavailable
from obsdiff.errors import ConfigError
from obsdiff.runs.loading import load_pipeline
from obsdiff.solver.obs import holds_nm

TEXT = 264  # the tiny pipeline's CLIP length (8) + T5 default (256)


@pytest.fixture(scope="module")
def model(tiny_sd3_dir):
    return load_pipeline(str(tiny_sd3_dir))


def inputs(model, batch=2, seed=0):
    return model.family.example_inputs(model.denoiser, batch=batch, text_len=TEXT,
                                       generator=torch.Generator().manual_seed(seed))


def reference(model, kw):
    with torch.no_grad():
        return model.denoiser(**kw, return_dict=False)[0]


def test_torch_runner_is_the_model(model):
    runner = R.make_runner("torch")
    assert runner.available() == (True, "")
    runner.prepare(model)
    kw = inputs(model)
    assert torch.equal(runner(**kw), reference(model, kw))


def test_onnxruntime_matches_torch_on_every_batch_of_the_profile(model, tiny_onnx_dir):
    runner = R.make_runner("onnxruntime", onnx=tiny_onnx_dir)
    runner.prepare(model)
    assert runner.details["providers"] == ["CPUExecutionProvider"]
    for batch in (1, 3):
        kw = inputs(model, batch=batch, seed=batch)
        out = runner(**kw)
        assert out.dtype == torch.float32 and out.shape == kw["hidden_states"].shape
        assert float((out - reference(model, kw)).abs().max()) < 1e-4


def test_compile_runner_plumbing_matches_torch(model):
    runner = R.make_runner("torch-compile", backend="eager")  # the runner's own logic; inductor: the slow test
    runner.prepare(model)
    assert runner.details["cuda_graphs"] is False and runner.min_warmup >= 1
    kw = inputs(model)
    assert float((runner(**kw) - reference(model, kw)).abs().max()) < 1e-6


@pytest.mark.slow
def test_inductor_compiled_denoiser_matches_torch(model):
    runner = R.make_runner("torch-compile")
    assert runner.available()[0]
    runner.prepare(model)
    kw = inputs(model)
    assert float((runner(**kw) - reference(model, kw)).abs().max()) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_gpu_backends_say_why_they_cannot_run_here(model):
    ok, why = R.make_runner("torch-sparse24").available()
    assert not ok and "no CUDA GPU" in why
    with pytest.raises(RunnerUnavailable, match="on cpu.*CUDA"):
        R.make_runner("torch-sparse24").prepare(model)
    ok, why = R.make_runner("tensorrt").available()
    assert not ok and ("pip install --extra-index-url https://pypi.nvidia.com tensorrt" in why or "CUDA GPU" in why)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparse24_matches_torch_on_gpu(tiny_run_24):
    from obsdiff.info import sparse_tensor_cores

    if not sparse_tensor_cores()[0]:
        pytest.skip(sparse_tensor_cores()[1])
    model = load_pipeline(str(tiny_run_24), device="cuda", dtype="fp16")
    runner = R.make_runner("torch-sparse24")
    try:
        runner.prepare(model)
    except RunnerUnavailable as exc:  # tiny widths may be below the kernels' minimum shapes
        pytest.skip(str(exc))
    kw = {k: v.cuda().half() for k, v in inputs(model).items()}
    assert float((runner(**kw) - reference(model, kw)).abs().max()) < 5e-2


def test_nm_pattern_detection():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4], [0, 0, 0, 1, 5, 0, 0, 6]])
    assert holds_nm(w, (2, 4)) and holds_nm(w.numpy(), (2, 4))  # the one check, for torch and numpy weights
    assert holds_nm(w.T.numpy().T, (2, 4))  # a transposed (non-contiguous) layout
    w[0, 1] = 7  # three non-zeros in the first group
    assert not holds_nm(w, (2, 4)) and not holds_nm(w.numpy(), (2, 4)) and holds_nm(w, (3, 4))
    assert not holds_nm(torch.zeros(2, 6), (2, 4))  # d_in not a multiple of 4


def test_pruned_run_weights_are_2_4(tiny_run_24):
    run = load_pipeline(str(tiny_run_24))
    linears = {n: m for n, m in run.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    sparse = [n for n, m in linears.items() if holds_nm(m.weight.detach(), (2, 4))]
    assert len(sparse) == 21 and all("norm" not in n for n in sparse)


def test_onnx_of_another_model_is_refused(tiny_run_24, tiny_onnx_dir):
    run = load_pipeline(str(tiny_run_24))
    with pytest.raises(ConfigError, match="dense model.*pruned run"):
        R.make_runner("onnxruntime", onnx=tiny_onnx_dir).prepare(run)


def test_unknown_backend_and_option():
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'"):
        R.make_runner("tensorflow")
    with pytest.raises(ConfigError, match="no option 'engine'"):
        R.make_runner("onnxruntime", engine="x.plan")


def test_runner_module_stands_in_for_the_denoiser_in_a_pipeline(tiny_sd3_dir, tiny_onnx_dir):
    model = load_pipeline(str(tiny_sd3_dir))
    pipe = model.pipeline
    kw = dict(prompt=["a photo of digit seven"], num_inference_steps=2, guidance_scale=2.0, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    runner = R.make_runner("onnxruntime", onnx=tiny_onnx_dir)
    runner.prepare(model)
    original = pipe.transformer
    object.__setattr__(pipe, "transformer", R.RunnerModule(runner, original))
    try:
        out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        object.__setattr__(pipe, "transformer", original)
    assert out.shape == ref.shape and float(abs(out - ref).max()) < 1e-4


def test_graph_runners_refuse_arguments_their_graph_has_no_input_for(model, tiny_onnx_dir):
    runner = R.make_runner("onnxruntime", onnx=tiny_onnx_dir)
    runner.prepare(model)
    kw = inputs(model)
    runner(**kw, joint_attention_kwargs=None, return_dict=False)  # what pipelines pass: fine
    with pytest.raises(ConfigError, match="no input for the denoiser argument 'skip_layers'"):
        runner(**kw, skip_layers=[1])
