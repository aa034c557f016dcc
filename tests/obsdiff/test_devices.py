"""obsdiff.devices: dtype names, --device/--dtype auto, and the accelerator helpers on the CPU."""

import pytest
import torch

from obsdiff.devices import (
    DTYPES,
    FLOAT_NAMES,
    SAFETENSORS_DTYPES,
    default_dtype,
    dtype_name,
    empty_cache,
    free_bytes,
    peak_bytes,
    resolve_device,
    synchronize,
    time_call,
    torch_dtype,
)
from obsdiff.errors import ConfigError


def test_dtype_names_round_trip():
    for short, long in DTYPES.items():
        assert torch_dtype(short) is torch_dtype(long) is getattr(torch, long)
        assert dtype_name(getattr(torch, long)) == short
    assert dtype_name(torch.float64) == "float64"
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; use one of auto, fp32, fp16, bf16"):
        torch_dtype("fp8")


def test_every_dtype_table_names_torch_dtypes():
    assert DTYPES.items() <= FLOAT_NAMES.items()
    for long in [*FLOAT_NAMES.values(), *SAFETENSORS_DTYPES.values()]:
        assert isinstance(getattr(torch, long), torch.dtype), long
    assert set(FLOAT_NAMES.values()) <= set(SAFETENSORS_DTYPES.values())  # every float obsdiff names can be stored


def test_auto_dtype_follows_the_device():
    assert torch_dtype("auto", "cpu") is torch.float32
    assert torch_dtype("auto", torch.device("cuda")) is torch.bfloat16  # no GPU needed to decide
    assert default_dtype(torch.device("cuda", 1)) is torch.bfloat16
    assert torch_dtype("auto") is default_dtype(resolve_device("auto"))


def test_resolve_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device 'gpu' is not a device name"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="--device 'meta' holds no data"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="--device cuda:1 requested but no CUDA GPU is available"):
        resolve_device("cuda:1")


def test_cpu_helpers():
    cpu = torch.device("cpu")
    synchronize(cpu)
    empty_cache(cpu)
    assert free_bytes(cpu) is None and peak_bytes(cpu) is None
    calls = []
    seconds = time_call(lambda: calls.append(sum(range(10_000))), cpu)
    assert calls == [49995000] and 0 < seconds < 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accelerator_helpers_on_cuda():
    cuda = torch.device("cuda")
    x = torch.randn(2048, 2048, device=cuda)
    seconds = time_call(lambda: x @ x, cuda)
    synchronize(cuda)
    assert 0 < seconds < 5
    assert free_bytes(cuda) > 0 and peak_bytes(cuda) >= x.numel() * 4
