"""Calibrators: where Hessians accumulate (`hessian_device`), the recorded time split, rerun passes."""

import time

import pytest
import torch

import obsdiff.calibration.calibrate as C
from obsdiff.calibration.caches import MemoryCache, SpillCache
from obsdiff.calibration.calibrate import encode_batches, make_calibrator
from obsdiff.calibration.prompts import calibration_prompts, generic_prompts
from obsdiff.config import CalibConfig, PruneConfig, resolve_calib
from obsdiff.errors import ConfigError
from obsdiff.runs.loading import as_loaded
from obsdiff.solver.hessian import HessianAccumulator
from tests.conftest import tiny_sd3

CALIB = dict(num_prompts=4, steps=3, guidance=2.0, batch_size=2)
LINEARS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn.add_q_proj"]


@pytest.fixture(scope="module")
def model():
    return as_loaded(tiny_sd3())


def calibrator(model, **calib):
    cfg = resolve_calib(CalibConfig(**(CALIB | calib)), None, "obs-diff")
    return make_calibrator(model, PruneConfig(sparsity=0.5), cfg, model.family.blocks(model.denoiser),
                           progress=False)


@pytest.fixture
def asked_devices(monkeypatch):
    """The device every accumulator the calibrators create is asked to allocate its Hessian on."""
    asked = []

    class Recording(HessianAccumulator):
        def __init__(self, d_in, device="cpu", *args, **kwargs):
            asked.append(torch.device(device))
            super().__init__(d_in, device, *args, **kwargs)

    monkeypatch.setattr(C, "HessianAccumulator", Recording)
    return asked


@pytest.mark.parametrize("mode", ["rerun", "cached"])
def test_hessians_go_to_the_hessian_device_and_equal_the_model_device_ones(model, mode, asked_devices):
    """`cpu:0` is a CPU device that differs from the model's `cpu`, so it shows --hessian-device is honoured
    even on a machine without accelerators."""
    default, _ = calibrator(model, mode=mode).hessians(LINEARS, "a")
    assert asked_devices == [torch.device("cpu")] * len(LINEARS)  # unset: the model's device
    asked_devices.clear()
    cal = calibrator(model, mode=mode, hessian_device="cpu:0")
    on_cpu, _ = cal.hessians(LINEARS, "b")
    assert asked_devices == [torch.device("cpu", 0)] * len(LINEARS)
    for name in LINEARS:
        assert on_cpu[name].H.device.type == "cpu"
        assert torch.equal(on_cpu[name].H, default[name].H), name
    assert cal.stats()["hessian_device"] == "cpu:0"


@pytest.mark.parametrize("name,match", [("meta", "holds no data"), ("gpu0", "not a device name"),
                                        ("cuda:x", "not a device name")])
def test_unusable_hessian_devices_are_refused_in_one_line(name, match):
    with pytest.raises(ConfigError, match=match) as info:
        CalibConfig(hessian_device=name)
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_encoding(model):
    with pytest.raises(ConfigError, match="hessian-device 'cuda' is not usable") as info:
        calibrator(model, hessian_device="cuda")
    assert "\n" not in str(info.value)


@pytest.fixture
def spent(monkeypatch):
    """Seconds spent inside Hessian accumulation (`add`) and block-input cache I/O (`io`), timed around those
    methods themselves, and their calls; each call also sleeps 2 ms so that the timed work is well above the
    calibrators' own bookkeeping."""
    spent = {"add": 0.0, "io": 0.0, "add_calls": 0, "io_calls": 0}

    def timed(cls, name, key):
        real = getattr(cls, name)

        def method(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                time.sleep(0.002)
                return real(self, *args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0
                spent[f"{key}_calls"] += 1

        monkeypatch.setattr(cls, name, method)

    timed(HessianAccumulator, "add", "add")
    for name in ("append", "read", "write"):
        timed(MemoryCache, name, "io")
    return spent


# What a calibrator's clock may add to each timed call: two clock reads and a Python call (about 10 us measured
# on a 2-core CPU); 1 ms a call leaves room for a busy machine's scheduling (tests run two at a time) and stays
# below one block's forward (the cached sweep's advance: 2.5 to 5 ms a call there), so time counted in the wrong
# term is caught.
SLACK_PER_CALL = 1e-3


def test_stats_split_the_calibration_time(model, spent):
    cal = calibrator(model)
    accs, seconds = cal.hessians(LINEARS, "a")
    accs2, seconds2 = cal.hessians(LINEARS[:1], "b")
    stats = cal.stats()
    assert stats["mode"] == "rerun" and stats["pipeline_runs"] == 2
    assert spent["add_calls"] == sum(a.calls for a in [*accs.values(), *accs2.values()])
    slack = SLACK_PER_CALL * spent["add_calls"]
    assert spent["add"] <= stats["hessian_seconds"] <= spent["add"] + slack
    assert stats["forward_seconds"] == pytest.approx(seconds + seconds2 - spent["add"], abs=slack)


def test_rerun_hessians_follow_the_pruned_model(model):
    """Each rerun pass sees the current weights: pruning block 0 changes block 1's Hessian."""
    cal = calibrator(model)
    name = "transformer_blocks.1.attn.to_q"
    before, _ = cal.hessians([name], "a")
    w = dict(model.denoiser.named_modules())["transformer_blocks.0.ff.net.2"].weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(0.5)
        after, _ = cal.hessians([name], "b")
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not torch.allclose(before[name].H, after[name].H)
    assert after[name].calls == before[name].calls == 2 * 3  # 2 batches x 3 steps, the last step cut short


def test_cached_stats_split_capture_and_sweeps(model, spent):
    cal = calibrator(model, mode="cached")
    _, s0 = cal.hessians(LINEARS[:2], "block 0")  # the capture run fills these
    _, s1 = cal.hessians(LINEARS[2:], "block 1")  # a sweep: advance block 0, hooks in block 1
    stats = cal.stats()
    assert stats["pipeline_runs"] == stats["captures"] == 1 and stats["advance_seconds"] > 0
    assert stats["cache_location"] == "memory"
    # 6 calls (2 batches x 3 steps) appended by the capture, then read and written back by the advancing sweep
    assert spent["io_calls"] == 3 * stats["cache_calls"] == 3 * 6
    for key, stat in (("add", "hessian_seconds"), ("io", "io_seconds")):
        assert spent[key] <= stats[stat] <= spent[key] + SLACK_PER_CALL * spent[f"{key}_calls"], stat
    slack = SLACK_PER_CALL * (spent["add_calls"] + spent["io_calls"])
    assert stats["forward_seconds"] == pytest.approx(s0 + s1 - spent["add"] - spent["io"], abs=slack)
    assert stats["capture_seconds"] <= s0


# ------------------------------------------------------------------------------------------ prompts and seeds


def test_calibration_prompts_are_seeded_shuffles_cycled_to_the_count(tmp_path):
    pool = generic_prompts()
    assert len(pool) == len(set(pool)) == 100
    a = calibration_prompts(CalibConfig(num_prompts=30, seed=1), None)
    assert a == calibration_prompts(CalibConfig(num_prompts=30, seed=1), None)  # reproducible
    assert a != calibration_prompts(CalibConfig(num_prompts=30, seed=2), None)  # the seed shuffles
    assert len(set(a)) == 30 and set(a) <= set(pool)
    assert a != pool[:30]  # shuffled, not the first prompts of the pool
    file = tmp_path / "p.txt"
    file.write_text("one\n\n  two  \nthree\n")
    got = calibration_prompts(CalibConfig(prompts=str(file), num_prompts=7, seed=0), None)
    assert got[:3] == got[3:6] and got[6] == got[0]  # three prompts cycled to seven, in one shuffled order
    assert sorted(got[:3]) == ["one", "three", "two"]  # stripped, blank lines dropped


def test_digits_calibration_prompts_name_digits():
    got = calibration_prompts(CalibConfig(num_prompts=40), "digits")
    assert len(got) == 40 and len(set(got)) == 40
    assert not set(got) & set(generic_prompts())


def test_missing_prompts_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=rf"--prompts '{missing}': no such file"):
        calibration_prompts(CalibConfig(prompts=str(missing), num_prompts=2), None)


def test_encode_batches_splits_prompts_and_gives_each_image_its_seed(model):
    cfg = CalibConfig(num_prompts=5, batch_size=2, guidance=2.0, seed=10)
    prompts = calibration_prompts(cfg, None)
    batches = encode_batches(model, prompts, cfg)
    assert [b.seeds for b in batches] == [[10, 11], [12, 13], [14]]  # image i: seed + i, whatever the batch
    assert [b.embeddings["prompt_embeds"].shape[0] for b in batches] == [2, 2, 1]
    # each batch holds its own prompts' embeddings: the same as encoding that prompt alone
    alone = model.family.encode_prompts(model.pipeline, [prompts[4]], cfg.guidance, None)
    torch.testing.assert_close(batches[2].embeddings["prompt_embeds"], alone["prompt_embeds"])


# ------------------------------------------------------------------------------------------ block-input caches


def block_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 5, 8, generator=g), "temb": torch.randn(2, 8, generator=g).half(),
            "mask": torch.rand(3, generator=g) > 0.5, "pair": (torch.randn(4, generator=g), 3),
            "extra": {"ids": torch.arange(6, dtype=torch.int64).view(2, 3)}, "scale": 0.5, "none": None}


def assert_same_inputs(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_inputs(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_inputs(x, y)
    else:
        assert a == b


def test_memory_and_spill_caches_round_trip_the_same_inputs(tmp_path):
    cpu = torch.device("cpu")
    memory, spill = MemoryCache(cpu), SpillCache(tmp_path, capacity=2**16)  # room for all: no growth
    for cache in (memory, spill):
        for i in range(3):
            cache.append(block_inputs(i), step=i % 2)
    assert len(memory) == len(spill) == 3
    assert memory.nbytes > 0 and spill.nbytes >= memory.nbytes  # the file aligns every tensor
    for i in range(3):
        (m, m_step), (s, s_step) = memory.read(i, cpu), spill.read(i, cpu)
        assert m_step == s_step == i % 2
        assert_same_inputs(m, block_inputs(i))
        assert_same_inputs(s, block_inputs(i))
    # the frontier written back (same shapes) lands in place; the spill file does not grow
    size = spill.nbytes
    for cache in (memory, spill):
        cache.write(1, block_inputs(7))
    assert spill.nbytes == size
    for cache in (memory, spill):
        assert_same_inputs(cache.read(1, cpu)[0], block_inputs(7))
        assert cache.read(1, cpu)[1] == 1
        assert_same_inputs(cache.read(2, cpu)[0], block_inputs(2))  # the neighbours are untouched
    spill.close()


def test_spill_cache_keeps_its_data_when_the_file_grows(tmp_path):
    spill = SpillCache(tmp_path, capacity=64)  # far too small: every append grows the file
    for i in range(3):
        spill.append(block_inputs(i), step=0)
    assert spill.nbytes > 64
    try:
        for i in range(3):
            assert_same_inputs(spill.read(i, torch.device("cpu"))[0], block_inputs(i))
    finally:
        spill.close()


def test_spill_file_lives_in_the_workdir_and_is_deleted_on_close(tmp_path):
    cache = SpillCache(tmp_path, capacity=1024)
    cache.append(block_inputs(0), step=0)
    assert cache.path.parent == tmp_path and cache.path.is_file() and cache.location == str(cache.path)
    assert cache.path.name.startswith("obsdiff-block-inputs-")
    cache.close()
    assert not cache.path.exists() and list(tmp_path.iterdir()) == [] and len(cache) == 0
    cache.close()  # a second close is harmless


def test_spill_file_is_deleted_when_the_cache_is_dropped(tmp_path):
    import gc

    cache = SpillCache(tmp_path, capacity=1024)
    path = cache.path
    cache.append(block_inputs(0), step=0)
    del cache
    gc.collect()
    assert not path.exists()
