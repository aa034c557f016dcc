"""The run format: what `read_run` refuses, single-file round trips, the base check, shard planning."""

import json

import pytest
import torch

from obsdiff.config import PruneConfig
from obsdiff.errors import ModelLoadError
from obsdiff.pruning.prune import prune_
from obsdiff.runs import io, rebuild
from obsdiff.runs.loading import load_pipeline


@pytest.fixture(scope="module")
def unstructured_run(tiny_sd3_dir, tmp_path_factory):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(method="magnitude", sparsity=0.6), progress=False)
    return model, io.save_run(model, report.to_dict(), tmp_path_factory.mktemp("runs") / "u60")


def test_unstructured_single_file_round_trip(unstructured_run):
    model, run = unstructured_run
    record = io.read_run(run)
    assert record.format == io.FORMAT_VERSION and record.family == "sd3" and record.weights_dtype == "fp32"
    assert not record.shrink_plan and record.denoiser_file == f"denoiser/{io.WEIGHTS_FILE}"
    assert record.to_dict() == json.loads((run / io.RUN_FILE).read_text())  # the whole record, as stored
    state = rebuild.read_run_weights(run, record)
    ours = model.denoiser.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
    pruned = [r["name"] for r in record.layers]
    assert pruned and all(
        int((state[f"{n}.weight"] == 0).sum()) == round(0.6 * state[f"{n}.weight"].numel()) for n in pruned)
    rebuilt = rebuild.build_run_denoiser(run, record, model.family, torch.float32)
    assert all(torch.equal(rebuilt.state_dict()[k], ours[k]) for k in ours)


def copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest


def edit_record(run, **changes):
    record = json.loads((run / io.RUN_FILE).read_text())
    for k, v in changes.items():
        if v is None:
            record.pop(k, None)
        else:
            record[k] = v
    (run / io.RUN_FILE).write_text(json.dumps(record))


def test_damaged_records_are_refused_by_name(unstructured_run, tmp_path):
    _, run = unstructured_run
    broken = copy_run(run, tmp_path / "broken")
    (broken / io.RUN_FILE).write_text('{"format": 2, "base_')
    with pytest.raises(ModelLoadError, match=r"obsdiff\.json is unreadable .*the run directory is damaged"):
        io.read_run(broken)
    (broken / io.RUN_FILE).write_text(json.dumps({"format": 2, "denoiser_file": "x"}))
    with pytest.raises(ModelLoadError, match="has no 'base_model'; it was not written by obsdiff prune"):
        io.read_run(broken)
    newer = copy_run(run, tmp_path / "newer")
    edit_record(newer, format=io.FORMAT_VERSION + 1)
    with pytest.raises(ModelLoadError, match=rf"has format {io.FORMAT_VERSION + 1}, newer than .*update obsdiff"):
        io.read_run(newer)
    assert not io.is_run_dir(tmp_path) and io.is_run_dir(newer)


def test_a_replaced_weight_file_fails_its_hash(unstructured_run, tmp_path):
    model, run = unstructured_run
    swapped = copy_run(run, tmp_path / "swapped")
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    state["proj_out.bias"] += 1  # a well-formed file with other weights
    save_file(state, str(swapped / "denoiser" / io.WEIGHTS_FILE))
    record = io.read_run(swapped)
    with pytest.raises(ModelLoadError, match=rf"{io.WEIGHTS_FILE} does not match the hash in obsdiff\.json"):
        rebuild.read_run_weights(swapped, record)
    with pytest.raises(ModelLoadError, match="does not match the hash"):
        rebuild.build_run_denoiser(swapped, record, model.family, torch.float32)


def test_base_config_mismatch_names_the_key(unstructured_run, tmp_path):
    _, run = unstructured_run
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((run / "denoiser" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"num_layers": 7, "_diffusers_version": "0.0"}))
    with pytest.raises(ModelLoadError, match=r"denoiser config num_layers is 2 in the run and 7 in the base"):
        rebuild.check_base_matches(run, other, "base-ref")
    (other / "config.json").write_text(json.dumps(config | {"_diffusers_version": "0.0"}))
    rebuild.check_base_matches(run, other, "base-ref")  # private keys (versions) do not count


def test_extra_or_missing_tensors_are_refused(unstructured_run, tmp_path):
    from safetensors.torch import save_file

    model, run = unstructured_run
    odd = copy_run(run, tmp_path / "odd")
    state = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    weights = odd / "denoiser" / io.WEIGHTS_FILE
    for name, change in [("unexpected", {"extra.weight": torch.zeros(1)}), ("missing", None)]:
        tensors = state | change if change else {k: v for k, v in state.items() if k != "proj_out.bias"}
        save_file(tensors, str(weights))
        edit_record(odd, denoiser_sha256=None, denoiser_shards=None)  # as if unhashed: reach the key check
        expected = "extra.weight" if change else "proj_out.bias"
        with pytest.raises(ModelLoadError, match=rf"does not fit its base model \({name} {expected}\)"):
            rebuild.build_run_denoiser(odd, io.read_run(odd), model.family, torch.float32)


def test_plan_shards_is_greedy_and_gives_a_big_tensor_its_own_shard():
    state = {k: torch.zeros(n) for k, n in [("a", 10), ("b", 30), ("c", 5), ("d", 100), ("e", 1)]}
    itemsize = dict.fromkeys(state, 4)
    assert io._plan_shards(state, itemsize, 160) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert io._plan_shards(state, itemsize, 10**6) == [list(state)]
    assert io._plan_shards({}, {}, 10) == [[]]


def test_combined_sha256_ignores_order_and_sees_every_hash():
    a = {"denoiser/x": "1" * 64, "denoiser/y": "2" * 64}
    b = dict(reversed(a.items()))
    assert io.combined_sha256(a) == io.combined_sha256(b)
    assert io.combined_sha256(a) != io.combined_sha256(a | {"denoiser/y": "3" * 64})


def test_safetensors_header_of_garbage_is_one_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors is not a readable safetensors file"):
        io.safetensors_header(junk)
    junk.write_bytes(b"\x01")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        io.safetensors_header(junk)
