"""Run directories: sharded weights with per-shard hashes, base-dtype storage, old runs, up-front checks."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from obsdiff.config import PruneConfig
from obsdiff.errors import ConfigError, ModelLoadError, OutputExistsError
from obsdiff.pruning.prune import prune_
from obsdiff.runs import io, rebuild
from obsdiff.runs.artifacts import sha256_file
from obsdiff.runs.loading import load_pipeline

TINY_SHARD = "40KB"  # the tiny SD3 denoiser is ~0.2 MB in fp32: several shards


def header_dtypes(folder):
    files = sorted(folder.glob("*.safetensors"))
    return {info["dtype"] for f in files for k, info in io.safetensors_header(f).items() if k != "__metadata__"}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def pruned_24(tiny_sd3_dir):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
    return model, report.to_dict()


@pytest.fixture(scope="module")
def sharded_run(pruned_24, tmp_path_factory):
    model, report = pruned_24
    return io.save_run(model, report, tmp_path_factory.mktemp("runs") / "sharded", max_shard_size=TINY_SHARD)


def test_sharded_run_round_trip_is_bitwise(pruned_24, sharded_run):
    model, _ = pruned_24
    record = json.loads((sharded_run / "obsdiff.json").read_text())
    folder = sharded_run / "denoiser"
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (folder / io.WEIGHTS_FILE).exists()
    assert record["format"] == 2 and record["denoiser_file"] == f"denoiser/{io.INDEX_FILE}"
    assert record["denoiser_shards"] == {f"denoiser/{f.name}": sha256_file(f) for f in shards}
    assert record["denoiser_sha256"] == io.combined_sha256(record["denoiser_shards"])
    for f in shards:  # at most the shard size of tensor data, unless one tensor alone is bigger
        infos = [v for k, v in io.safetensors_header(f).items() if k != "__metadata__"]
        assert sum(v["data_offsets"][1] - v["data_offsets"][0] for v in infos) <= 40_000 or len(infos) == 1
    weight_map = json.loads((folder / io.INDEX_FILE).read_text())["weight_map"]
    assert set(weight_map) == set(model.denoiser.state_dict()) and set(weight_map.values()) == {f.name for f in shards}
    assert record["weights_dtype"] == "fp32"  # the tiny base is saved in fp32

    reloaded = load_pipeline(str(sharded_run))
    assert_same_state(model.denoiser, reloaded.denoiser)
    # the denoiser folder is a plain diffusers sharded checkpoint as well
    from diffusers import SD3Transformer2DModel

    assert_same_state(model.denoiser, SD3Transformer2DModel.from_pretrained(folder))


def test_structured_run_in_shards_reloads(tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.5),
                    progress=False)
    run = io.save_run(model, report.to_dict(), tmp_path / "run", max_shard_size=TINY_SHARD)
    assert len(json.loads((run / "obsdiff.json").read_text())["denoiser_shards"]) > 1
    reloaded = load_pipeline(str(run))
    assert_same_state(model.denoiser, reloaded.denoiser)
    assert reloaded.denoiser.transformer_blocks[0].attn.heads == 1


def test_corrupt_or_missing_shard_is_named(sharded_run, tmp_path):
    from obsdiff.cli import cli

    broken = tmp_path / "broken"
    shutil.copytree(sharded_run, broken)
    shard = broken / "denoiser" / "diffusion_pytorch_model-00002-of-{:05d}.safetensors".format(
        len(list((broken / "denoiser").glob("*-of-*.safetensors"))))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{shard.name} does not match the hash in obsdiff.json"):
        load_pipeline(str(broken))
    r = CliRunner().invoke(cli, ["generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and shard.name in r.output and len(r.output.strip().splitlines()) == 1, r.output

    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"lacks its weights denoiser/{shard.name}"):
        load_pipeline(str(broken))


def test_old_single_file_runs_still_load(pruned_24, tmp_path, tiny_sd3_dir):
    model, report = pruned_24
    run = tmp_path / "old"
    model.denoiser.save_pretrained(run / "denoiser", safe_serialization=True)
    weights = run / "denoiser" / io.WEIGHTS_FILE
    record = {"format": 1, "base_model": str(tiny_sd3_dir.resolve()), "family": "sd3",
              "denoiser_file": f"denoiser/{io.WEIGHTS_FILE}", "denoiser_sha256": sha256_file(weights), **report}
    (run / "obsdiff.json").write_text(json.dumps(record))
    assert_same_state(model.denoiser, load_pipeline(str(run)).denoiser)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match the hash"):
        load_pipeline(str(run))


def test_single_shard_keeps_the_plain_layout(pruned_24, tmp_path):
    model, report = pruned_24
    run = io.save_run(model, report, tmp_path / "run")
    record = json.loads((run / "obsdiff.json").read_text())
    weights = run / "denoiser" / io.WEIGHTS_FILE
    assert record["denoiser_file"] == f"denoiser/{io.WEIGHTS_FILE}" and not (run / "denoiser" / io.INDEX_FILE).exists()
    assert record["denoiser_sha256"] == sha256_file(weights) == record["denoiser_shards"][record["denoiser_file"]]


@pytest.fixture(scope="module")
def digits():
    return load_pipeline("builtin:digits")  # ships fp16, loaded here in fp32


def test_base_dtype_is_stored_by_default_and_can_be_overridden(digits, tmp_path):
    assert digits.denoiser.dtype == torch.float32
    sizes = {}
    for name, dtype, header in [("base", None, "F16"), ("fp32", "fp32", "F32"), ("bf16", torch.bfloat16, "BF16")]:
        run = io.save_run(digits, {}, tmp_path / name, dtype=dtype)
        record = json.loads((run / "obsdiff.json").read_text())
        assert record["weights_dtype"] == {"base": "fp16"}.get(name, name)
        assert header_dtypes(run / "denoiser") == {header}
        sizes[name] = (run / "denoiser" / io.WEIGHTS_FILE).stat().st_size
    assert sizes["base"] < 0.51 * sizes["fp32"]
    # fp16 on disk, loaded in fp32: exactly the weights the fp16 base gives in fp32
    assert_same_state(digits.denoiser, load_pipeline(str(tmp_path / "base")).denoiser)
    assert load_pipeline(str(tmp_path / "base"), dtype="fp16").denoiser.dtype == torch.float16


def test_stored_dtype_reads_headers_and_takes_the_dominant_dtype(tmp_path, tiny_sd3_dir):
    from safetensors.torch import save_file

    save_file({"big": torch.zeros(100, dtype=torch.bfloat16), "small": torch.zeros(10),
               "steps": torch.zeros(1000, dtype=torch.int64)}, str(tmp_path / io.WEIGHTS_FILE))
    assert io.stored_dtype(tmp_path) == "bf16"
    assert io.stored_dtype(tiny_sd3_dir / "transformer") == "fp32"
    assert io.stored_dtype(tmp_path / "nothing") is None


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_two_four_masks_survive_the_cast(pruned_24, tmp_path, dtype):
    model, report = pruned_24
    run = io.save_run(model, report, tmp_path / "run", dtype=dtype)
    reloaded = load_pipeline(str(run)).denoiser
    ours, theirs = dict(model.denoiser.named_modules()), dict(reloaded.named_modules())
    pruned = [r["name"] for r in report["layers"] if r["sparsity"] > 0]
    assert pruned
    for name in pruned:
        w0, w1 = ours[name].weight, theirs[name].weight
        assert torch.equal(w0 == 0, w1 == 0), name
        assert ((w1.reshape(w1.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name


def test_save_checks_come_before_the_prune(pruned_24, tmp_path):
    model, report = pruned_24
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        io.check_can_save(model, tmp_path / "exists", force=False)
    assert io.check_can_save(model, tmp_path / "exists", force=True) == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        io.check_can_save(model, tmp_path / "new", dtype="fp8")
    assert io.check_can_save(model, tmp_path / "a" / "b" / "new", dtype="bf16") == torch.bfloat16
    assert not (tmp_path / "a").exists()  # checking writes nothing
    with pytest.raises(ConfigError, match="not a positive size"):
        io.save_run(model, report, tmp_path / "x", max_shard_size="lots")


def test_weights_that_overflow_the_save_dtype_are_refused(tiny_sd3_dir, tmp_path):
    model = load_pipeline(str(tiny_sd3_dir))
    with torch.no_grad():
        model.denoiser.transformer_blocks[1].ff.net[2].weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match=r"transformer_blocks\.1\.ff\.net\.2\.weight overflows fp16"):
        io.save_run(model, {}, tmp_path / "run", dtype="fp16")
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("text, expected", [("10GB", 10**10), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                            (" 1.5 kb", 1500), (4096, 4096)])
def test_parse_size(text, expected):
    assert io.parse_size(text) == expected


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_flux_and_sdxl_structured_runs_rebuild_from_shards(family, tmp_path):
    from obsdiff.runs.loading import as_loaded
    from tests.conftest import tiny_flux, tiny_sdxl

    model = as_loaded({"flux": tiny_flux, "sdxl": tiny_sdxl}[family]())
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="structured", sparsity=0.5),
                    progress=False)
    run = io.save_run(model, report.to_dict(), tmp_path / "run", max_shard_size="100KB")
    record = io.read_run(run)
    assert len(record.denoiser_shards) > 1 and record.weights_dtype == "fp32"  # no base on disk: as in memory
    assert_same_state(model.denoiser, rebuild.build_run_denoiser(run, record, model.family, torch.float32))


def test_unsaved_buffers_are_rebuilt_on_the_cpu(tmp_path):
    from diffusers import SD3Transformer2DModel

    from obsdiff.runs.loading import as_loaded
    from tests.conftest import tiny_sd3

    config = dict(tiny_sd3().transformer.config) | {"pos_embed_max_size": None}  # position table not saved
    model = as_loaded(tiny_sd3(transformer=SD3Transformer2DModel.from_config(config)))
    assert "pos_embed.pos_embed" not in model.denoiser.state_dict()
    run = io.save_run(model, {}, tmp_path / "run", max_shard_size="40KB")
    rebuilt = rebuild.build_run_denoiser(run, io.read_run(run), model.family, torch.bfloat16)
    assert_same_state(model.denoiser.to(torch.bfloat16), rebuilt)
    assert torch.equal(rebuilt.pos_embed.pos_embed, model.denoiser.pos_embed.pos_embed)
