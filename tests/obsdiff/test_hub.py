"""Hub ids for --model and runs that travel, on a hub cache laid out on disk (HF_HUB_OFFLINE: no network ever)."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from obsdiff.cli import cli
from obsdiff.errors import ModelLoadError
from obsdiff.runs.hub import parse_hub_id, resolve_model
from obsdiff.runs.loading import load_pipeline

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-sd3"


def make_hub_cache(cache, repo, src, sha=SHA, ref="main"):
    """`src` as huggingface_hub caches a download: blobs by content hash, a snapshot of links, refs/<ref>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / sha
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_sd3_dir):
    """An offline hub cache holding REPO (the tiny SD3 pipeline) at commit SHA; returns the snapshot folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return make_hub_cache(tmp_path / "hub-cache", REPO, tiny_sd3_dir)


def online(monkeypatch):
    """Network allowed, as far as obsdiff can tell (whatever the environment set when huggingface_hub loaded)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("ref, expected", [
    ("org/name", ("org/name", None)), ("org/name@main", ("org/name", "main")),
    (f"org/name.v2@{SHA}", ("org/name.v2", SHA)), ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("a/b/c", None), ("./org/name", None), ("org/name@", None), ("org/../name", None),
])
def test_what_counts_as_a_hub_id(ref, expected):
    assert parse_hub_id(ref) == expected


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h"}, "/c/hub"), ({"HF_HOME": "/h"}, "/h/hub"),
    ({"HUGGINGFACE_HUB_CACHE": "/legacy"}, "/legacy"),
])
def test_the_cache_is_read_from_the_environment_at_call_time(monkeypatch, env, expected):
    from obsdiff.runs.hub import hub_cache_dir

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert str(hub_cache_dir()) == expected


@pytest.mark.parametrize("suffix", ["", "@main", f"@{SHA}"])
def test_a_cached_hub_id_resolves_offline_to_its_snapshot(hub, suffix):
    src = resolve_model(REPO + suffix)
    assert src.path == hub and src.hub_id == REPO and src.revision == SHA and src.builtin is None


def test_prune_from_a_hub_id_records_it_and_the_run_travels(hub, tmp_path, tiny_sd3_dir):
    out = tmp_path / "work" / "run"
    r = run("prune", "--model", REPO, "--method", "magnitude", "--sparsity-type", "2:4", "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "obsdiff.json").read_text())
    assert record["base_model"] == f"{REPO}@{SHA}"
    assert record["base"] == {"hub_id": REPO, "revision": SHA}
    before = weights(load_pipeline(str(out)).denoiser)

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    loaded = load_pipeline(str(moved))
    assert loaded.hub_id == REPO and loaded.revision == SHA and loaded.path == hub
    after = weights(loaded.denoiser)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    w = after["transformer_blocks.0.attn.to_q.weight"]  # really the pruned weights: 2 of every 4 are zero
    assert int((w.reshape(-1, 4) == 0).sum(1).min()) >= 2
    r = run("generate", "--model", moved, "--prompt", "a red cat", "--steps", "2", "--out", tmp_path / "x.png")
    assert r.exit_code == 0, r.output


def test_the_cli_takes_a_hub_id_at_a_commit(hub, tmp_path):
    r = run("generate", "--model", f"{REPO}@{SHA}", "--prompt", "a cat", "--steps", "2", "--out", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_uncached_hub_id_offline_is_one_line_and_exit_2(hub, tmp_path):
    r = run("generate", "--model", "tiny-org/absent", "--prompt", "x", "--out", tmp_path / "x.png")
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and "'tiny-org/absent' is not in the local cache" in line
    assert "HF_HUB_OFFLINE" in line and "hf download tiny-org/absent" in line
    with pytest.raises(ModelLoadError, match=f"'{REPO}@v9' is not in the local cache .* unset HF_HUB_OFFLINE"):
        resolve_model(f"{REPO}@v9")  # a revision the cache does not know


def test_a_partly_cached_snapshot_is_not_taken_for_a_model(hub, tmp_path):
    shutil.rmtree(hub / "vae")
    with pytest.raises(ModelLoadError, match="is only partly in the local cache"):
        resolve_model(REPO)


def test_an_uncached_id_with_network_downloads_through_diffusers(hub, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    online(monkeypatch)
    calls = []

    def download(repo, revision=None, cache_dir=None):
        calls.append((repo, revision, cache_dir))
        return str(hub)

    monkeypatch.setattr(DiffusionPipeline, "download", download)
    src = resolve_model("tiny-org/other@v1")
    assert calls == [("tiny-org/other", "v1", str(tmp_path / "hub-cache"))]
    assert src.hub_id == "tiny-org/other" and src.revision == SHA and src.path == hub


def _http_error(cls, status):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/tiny-org/x")
    return cls("hub said no", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("make, message", [
    (lambda: _http_error(__import__("huggingface_hub.errors").errors.GatedRepoError, 403),
     "'tiny-org/x' is gated: accept its licence .* `hf auth login`"),
    (lambda: _http_error(__import__("huggingface_hub.errors").errors.RepositoryNotFoundError, 404),
     "no hub model 'tiny-org/x'"),
    (lambda: _http_error(__import__("huggingface_hub.errors").errors.RevisionNotFoundError, 404),
     "'tiny-org/x' has no revision 'v1'"),
    (lambda: __import__("huggingface_hub.errors").errors.OfflineModeIsEnabled("offline"),
     "'tiny-org/x@v1' is not in the local cache .* unset HF_HUB_OFFLINE"),
    (lambda: ConnectionError("Name or service not known"),
     r"could not be downloaded \(ConnectionError: Name or service not known\); check the network"),
])
def test_hub_failures_say_which_case_it_was(hub, monkeypatch, make, message):
    from diffusers import DiffusionPipeline

    online(monkeypatch)

    def download(repo, revision=None, cache_dir=None):
        try:  # diffusers wraps what the hub raised, as its own download does
            raise make()
        except Exception as exc:
            raise OSError(f"Cannot load model {repo}: see the root cause") from exc

    monkeypatch.setattr(DiffusionPipeline, "download", download)
    with pytest.raises(ModelLoadError, match=message):
        resolve_model("tiny-org/x@v1")


@pytest.fixture
def local_run(tmp_path, tiny_sd3_dir):
    """A magnitude 2:4 run of a local copy of the tiny pipeline: tmp/project/{base,runs/r}."""
    base = tmp_path / "project" / "base"
    shutil.copytree(tiny_sd3_dir, base)
    out = tmp_path / "project" / "runs" / "r"
    r = run("prune", "--model", base, "--method", "magnitude", "--sparsity-type", "2:4", "--out", out)
    assert r.exit_code == 0, r.output
    return base, out


def test_a_run_moved_together_with_its_base_loads(local_run, tmp_path):
    base, out = local_run
    record = json.loads((out / "obsdiff.json").read_text())
    assert record["base"] == {"path": "../../base", "absolute_path": str(base.resolve())}
    before = weights(load_pipeline(str(out)).denoiser)
    shutil.move(tmp_path / "project", tmp_path / "copied")
    loaded = load_pipeline(str(tmp_path / "copied" / "runs" / "r"))
    assert loaded.path == tmp_path / "copied" / "base"
    after = weights(loaded.denoiser)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_whose_base_is_gone_names_where_it_looked(local_run, tmp_path):
    base, out = local_run
    shutil.move(out, tmp_path / "r")
    shutil.rmtree(base)
    r = run("generate", "--model", tmp_path / "r", "--prompt", "x", "--out", tmp_path / "x.png")
    assert r.exit_code == 2 and "\n" not in r.output.strip()
    relative = tmp_path.parent / "base"  # ../../base from where the run was, now seen from tmp/r
    assert (f"cannot find its base model: looked in {relative} (relative to the run) and {base} (where it was when "
            "pruned)") in r.output


def test_a_run_without_base_record_loads_from_its_absolute_path(local_run, tmp_path):
    base, out = local_run
    record = json.loads((out / "obsdiff.json").read_text())
    del record["base"]  # as written before runs recorded how to find their base
    (out / "obsdiff.json").write_text(json.dumps(record))
    assert load_pipeline(str(out)).path == base.resolve()
    shutil.rmtree(base)
    with pytest.raises(ModelLoadError, match=f"looked in {base.resolve()} \\(where it was when pruned\\)"):
        load_pipeline(str(out))


def test_a_pipeline_object_loaded_from_the_hub_is_recorded_by_id_and_commit(hub, tmp_path):
    from diffusers import DiffusionPipeline

    from obsdiff.config import PruneConfig
    from obsdiff.pruning.prune import prune_
    from obsdiff.runs.io import save_run
    from obsdiff.runs.loading import as_loaded

    pipe = DiffusionPipeline.from_pretrained(hub)  # what diffusers records when given the id: the id itself
    pipe.register_to_config(_name_or_path=REPO)
    model = as_loaded(pipe)
    assert (model.hub_id, model.revision, model.path) == (REPO, SHA, hub)
    report = prune_(model, PruneConfig(method="magnitude", sparsity_type="2:4"), progress=False)
    record = json.loads((save_run(model, report.to_dict(), tmp_path / "run") / "obsdiff.json").read_text())
    assert record["base_model"] == f"{REPO}@{SHA}" and record["base"] == {"hub_id": REPO, "revision": SHA}
