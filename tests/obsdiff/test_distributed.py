"""Distributed pruning (torch.distributed, gloo on the CPU): two ranks give the single-process result.

The API cases run in one pair of processes spawned by `torch.multiprocessing` (each rank builds its own
model from the same folder); the CLI cases run the real `torchrun`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obsdiff.config import CalibConfig, PruneConfig, QuantConfig
from obsdiff.errors import ConfigError
from obsdiff.pruning.distributed import (
    RankFailed,
    World,
    assign_owners,
    balance,
    init_from_env,
    launched_by_torchrun,
    share_work,
)
from obsdiff.pruning.prune import open_checkpoint, prune_
from obsdiff.pruning.resume import share_checkpoint
from obsdiff.runs.loading import load_pipeline
from tests.conftest import tiny_flux

# One prompt per batch, so each of the two ranks runs two of the four batches.
CALIB = CalibConfig(num_prompts=4, steps=3, guidance=2.0, batch_size=1, groups=2)
CASES = {
    "unstructured": ("sd3", PruneConfig(sparsity=0.5), CALIB),
    "unstructured-seed1": ("sd3", PruneConfig(sparsity=0.5), CalibConfig(**{**CALIB.to_dict(), "seed": 1})),
    "unstructured-fp64": ("sd3", PruneConfig(sparsity=0.5, compute_dtype="fp64"), CALIB),
    "2:4-cached": ("sd3", PruneConfig(sparsity_type="2:4"), CalibConfig(**{**CALIB.to_dict(), "mode": "cached",
                                                                          "groups": None})),
    "structured-sensitivity": ("sd3", PruneConfig(sparsity_type="structured", sparsity=0.3,
                                                  allocation="sensitivity"), CALIB),
    "structured-sensitivity-fp64": ("sd3", PruneConfig(sparsity_type="structured", sparsity=0.3,
                                                       allocation="sensitivity", compute_dtype="fp64"), CALIB),
    "flux-structured": ("flux", PruneConfig(sparsity_type="structured", sparsity=0.3), CALIB),
    "magnitude": ("sd3", PruneConfig(method="magnitude", sparsity=0.5), None),
    # activation ranges are maxima over both ranks' calls: exact, so with fp64 solves the codes and every scale match
    "2:4-w8a8-fp64": ("sd3", PruneConfig(sparsity_type="2:4", compute_dtype="fp64",
                                         quant=QuantConfig("w8a8", smoothquant=0.5)), CALIB),
}

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, dirs: dict, out: str) -> None:
    """One rank: every case of CASES, then a failing solve on rank 1, then an interrupted and resumed prune."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = Path(out)
    world, _ = init_from_env(torch.device("cpu"))
    try:
        for name, (family, pcfg, ccfg) in CASES.items():
            model = load_pipeline(dirs[family])
            report = prune_(model, pcfg, ccfg, progress=False, world=world)
            torch.save({"state": model.denoiser.state_dict(), "report": report.to_dict()}, out / f"{name}-{rank}.pt")
        _failing_rank(world, dirs["sd3"], out)
        _interrupted_then_resumed(world, dirs["sd3"], out)
    finally:
        world.close()


def _failing_rank(world: World, model_dir: str, out: Path) -> None:
    import obsdiff.solver.obs

    original = obsdiff.solver.obs.obs_prune

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    if world.rank == 1:
        obsdiff.solver.obs.obs_prune = broken
    try:
        prune_(load_pipeline(model_dir), PruneConfig(sparsity=0.5), CALIB, progress=False, world=world)
        outcome = "no error"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        obsdiff.solver.obs.obs_prune = original
    (out / f"fault-{world.rank}.txt").write_text(outcome)


def _interrupted_then_resumed(world: World, model_dir: str, out: Path) -> None:
    """Rank 1 fails in the second group's solves; the same world resumes from rank 0's checkpoint."""
    import obsdiff.solver.obs

    original, saved = obsdiff.solver.obs.obs_prune, []

    def fails_after_first_group(*args, **kwargs):
        if saved:
            raise RuntimeError("crash in group 2")
        return original(*args, **kwargs)

    pcfg, run = PruneConfig(sparsity=0.5), out / "resumed"
    model = load_pipeline(model_dir)
    ckpt = open_checkpoint(model, pcfg, CALIB, run, world_size=world.size) if world.is_main else None
    shared = share_checkpoint(world, ckpt)
    if world.rank == 1:  # armed once the first group is stored
        obsdiff.solver.obs.obs_prune = fails_after_first_group
        save_group = shared.save_group
        shared.save_group = lambda *args, **kwargs: (save_group(*args, **kwargs), saved.append(True))
    try:
        prune_(model, pcfg, CALIB, progress=False, world=world, checkpoint=shared)
        raise AssertionError("the injected crash did not stop the prune")
    except RankFailed:
        assert world.rank == 0
    except RuntimeError as exc:
        assert world.rank == 1 and "crash in group 2" in str(exc)
    finally:
        obsdiff.solver.obs.obs_prune = original
    done = share_checkpoint(world, ckpt).done
    model = load_pipeline(model_dir)
    ckpt = open_checkpoint(model, pcfg, CALIB, run, resume=True, world_size=world.size) if world.is_main else None
    report = prune_(model, pcfg, CALIB, progress=False, world=world, checkpoint=share_checkpoint(world, ckpt))
    torch.save({"state": model.denoiser.state_dict(), "report": report.to_dict(), "done": done},
               out / f"resumed-{world.rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tiny_sd3_dir, tmp_path_factory):
    """Results of the two-rank runs, as files (spawned once for every test of this module)."""
    import torch.multiprocessing as mp

    flux_dir = tmp_path_factory.mktemp("tiny_flux") / "pipeline"
    tiny_flux().save_pretrained(flux_dir, safe_serialization=True)
    dirs = {"sd3": str(tiny_sd3_dir), "flux": str(flux_dir)}
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), dirs, str(out)), nprocs=2, join=True)
    return dirs, out


def _layer_bounds(single: dict, pcfg: PruneConfig) -> dict[str, float]:
    """Per pruned layer of the one-process report, its `weight_bound`."""
    group_of = {layer: g["index"] for g in single["groups"] for unit in g["units"] for layer in unit}
    calls = {g["index"]: g["calib_calls"] for g in single["groups"]}
    bounds = {}
    for r in single["layers"]:
        if r["error"] is None or r["percdamp"] is None:
            continue
        g = group_of.get(r["name"], 0)
        bounds[r["name"]] = weight_bound(r["shape"][1], r["percdamp"], calls.get(g, 1), pcfg.compute_dtype,
                                         first_group=g == min(calls, default=0))
    return bounds


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


# How far two ranks may land from one process. They compute the same calls on the same weights; only the
# order in which each Hessian's running mean is summed differs (rank r adds batches r, r + 2, ..., then the
# two partial means are combined). The argument, per layer:
# - `calls` running-mean updates in unit roundoff u round at most twice each, so two summation orders give
#   Hessians within ~2 * calls * u of each other, relative.
# - OBS solves with H + lambda I, lambda = percdamp * mean(diag H): its eigenvalues lie in
#   [lambda, trace H + lambda], so its condition number is at most 1 + d_in / percdamp, and the solution (the
#   compensated weights) moves by at most that times the Hessian's relative change.
# - The reported error is ||E||^2 / ||Y||^2 with E the change of the layer's output; ||E|| moves by at most the
#   output change of the weights, ||dW X|| / ||W X|| <= sqrt(kappa) * rel(dW) (X's conditioning is the square
#   root of H's), so sqrt(error) moves by at most sqrt(kappa) times the weights' measured relative change.
# Later groups are calibrated through earlier pruned groups, whose weights are stored in the model's float32:
# that rounding (u = 2^-24) enters every later group's Hessian whatever the solver precision, so fp64 solves are
# bounded like fp32 ones there and are in practice identical (the test records how far they are).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp64": 2.0**-53}
FP32 = UNIT_ROUNDOFF["fp32"]


def condition_bound(d_in: int, percdamp: float) -> float:
    return 1.0 + d_in / percdamp


def weight_bound(d_in: int, percdamp: float, calls: int, precision: str, first_group: bool) -> float:
    """Relative change of one layer's compensated weights allowed by summation order alone."""
    u = UNIT_ROUNDOFF[precision] if first_group else max(UNIT_ROUNDOFF[precision], FP32)
    return condition_bound(d_in, percdamp) * 2 * calls * u + FP32  # + the final rounding to float32


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process(two_ranks, name):
    dirs, out = two_ranks
    family, pcfg, ccfg = CASES[name]
    model = load_pipeline(dirs[family])
    single = prune_(model, pcfg, ccfg, progress=False).to_dict()
    expected = model.denoiser.state_dict()
    ranks = [torch.load(out / f"{name}-{r}.pt", weights_only=False) for r in (0, 1)]
    bounds = _layer_bounds(single, pcfg)
    for got in ranks:  # both ranks end with the same model
        state = got["state"]
        assert state.keys() == expected.keys()
        for key, w in expected.items():
            assert state[key].shape == w.shape, key
            assert torch.equal(state[key] == 0, w == 0), f"{name}: mask of {key} differs"
            # a solved layer within its summation-order bound; everything else is never changed by a solve
            assert _rel(state[key], w) <= bounds.get(key.removesuffix(".weight"), 0.0), key
        report = got["report"]
        assert bool(report["structures"]) == pcfg.structured
        assert [s["removed"] for s in report["structures"]] == [s["removed"] for s in single["structures"]]
        assert report["shrink_plan"] == single["shrink_plan"]
        assert (report["allocation"] or {}).get("removed") == (single["allocation"] or {}).get("removed")
        assert (report["allocation"] is None) == (pcfg.allocation != "sensitivity")
        assert [g["calib_calls"] for g in report["groups"]] == [g["calib_calls"] for g in single["groups"]]
        assert [r["name"] for r in report["layers"]] == [r["name"] for r in single["layers"]]
        for a, b in zip(report["layers"], single["layers"], strict=True):
            assert a["sparsity"] == b["sparsity"]
            if b["error"] is not None:
                moved = _rel(state[b["name"] + ".weight"], expected[b["name"] + ".weight"])
                kappa = condition_bound(b["shape"][1], b["percdamp"])
                allowed = kappa**0.5 * max(moved, FP32) + FP32
                assert abs(a["error"] ** 0.5 - b["error"] ** 0.5) <= allowed, (b["name"], a["error"], b["error"])
    dist = ranks[0]["report"]["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert sum(r["units_solved"] for r in dist["ranks"]) > 0
    assert all(r["units_solved"] > 0 for r in dist["ranks"])  # the solves were shared
    assert dist["bytes_communicated"] == sum(r["bytes_sent"] for r in dist["ranks"]) > 0
    if ccfg is not None:  # every rank ran two of the four prompt batches
        assert all(r["calib_seconds"] > 0 for r in dist["ranks"])


def test_a_failing_rank_stops_every_rank_and_rank_0_names_it(two_ranks):
    _, out = two_ranks
    assert (out / "fault-0.txt").read_text() == "RankFailed: rank 1 of 2 failed: RuntimeError: injected fault"
    assert (out / "fault-1.txt").read_text() == "RuntimeError: injected fault"


def test_resume_with_the_same_world_size_equals_an_uninterrupted_run(two_ranks):
    _, out = two_ranks
    whole = torch.load(out / "unstructured-0.pt", weights_only=False)
    for rank in (0, 1):
        resumed = torch.load(out / f"resumed-{rank}.pt", weights_only=False)
        assert resumed["done"] == 1  # the first group was kept, the second failed
        for key, w in whole["state"].items():
            assert torch.equal(resumed["state"][key], w), key
        assert [g["index"] for g in resumed["report"]["groups"]] == [0, 1]


def test_resume_with_another_world_size_is_refused(two_ranks, tiny_sd3_dir):
    _, out = two_ranks
    model = load_pipeline(str(tiny_sd3_dir))
    with pytest.raises(ConfigError, match="world_size"):
        open_checkpoint(model, PruneConfig(sparsity=0.5), CALIB, out / "resumed", resume=True)


def test_owners_balance_solve_cost():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, 2)
    assert owners == [0, 1, 1, 1, 1, 0]  # 8 first, then the two 4s to the idle rank, 2 to rank 0, ...
    assert balance(costs, owners, 2) == pytest.approx(1.0)  # 10 and 10
    assert assign_owners(costs, 1) == [0] * 6
    assert assign_owners([1.0], 4) == [0]
    assert balance([3.0, 1.0], [0, 0], 2) == pytest.approx(2.0)


def test_single_process_world_is_inert():
    assert not launched_by_torchrun({"RANK": "0"})
    assert launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    world = World()
    assert world.shard([1, 2, 3]) == [1, 2, 3] and world.all_gather(5) == [5]
    with pytest.raises(ValueError, match="boom"), world.failures():
        raise ValueError("boom")


def test_share_work_in_one_process_solves_every_item_once_in_order():
    modules = {name: torch.nn.Linear(d, 2) for name, d in (("a", 4), ("b", 8), ("c", 2))}
    world, solved = World(), []
    results = share_work(world, [["a"], ["b", "c"], ["c"]], modules, lambda i: solved.append(i) or f"item {i}",
                         tensors_of=lambda i: [modules["a"].weight])
    assert results == ["item 0", "item 1", "item 2"] and solved == [0, 1, 2]
    assert world.stats.units_solved == 3
    with pytest.raises(RuntimeError, match="no solve"):
        share_work(world, [["a"]], modules, lambda i: (_ for _ in ()).throw(RuntimeError("no solve")))


# ------------------------------------------------------------------------------------------ torchrun CLI

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
PRUNE = ["prune", "--sparsity-type", "2:4", "--num-prompts", "4", "--steps", "3", "--guidance", "2", "--batch-size",
         "1", "--groups", "2", "--device", "cpu", "--dtype", "fp32"]


def _failure_lines(stderr: str) -> str:
    """What a failed torchrun printed that says why: each rank's own error lines (a native abort's message comes
    long before torchrun's summary, which alone would fill the tail), then the tail."""
    said = [line for line in stderr.splitlines() if any(w in line for w in ("Error", "error:", "terminate", "what()"))]
    return "\n".join(said[:20]) + "\n...\n" + stderr[-1500:]


def _env(tmp_path: Path, fault: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env["OMP_NUM_THREADS"] = "1"
    if fault:  # rank 1 fails in its first solve, through a sitecustomize only this test puts on the path
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            "import os\n"
            "if os.environ.get('RANK') == '1':\n"
            "    import obsdiff.solver.obs\n"
            "    def broken(*a, **k):\n"
            "        raise RuntimeError('injected fault')\n"
            "    obsdiff.solver.obs.obs_prune = broken\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_torchrun_prune_writes_one_run_like_a_single_process(tiny_sd3_dir, tmp_path):
    runs, proc_two_stdout = {}, ""
    for launcher, name in ((TORCHRUN, "two"), ([sys.executable], "one")):
        cmd = [*launcher, "-m", "obsdiff", *PRUNE, "--model", str(tiny_sd3_dir), "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
        assert proc.returncode == 0, _failure_lines(proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stdout.count("| layers pruned") == 1  # only rank 0 prints
        proc_two_stdout = proc.stdout if name == "two" else proc_two_stdout
        runs[name] = json.loads((tmp_path / name / "obsdiff.json").read_text())
    assert runs["two"]["distributed"]["world_size"] == 2
    assert runs["one"]["distributed"] is None and "memory_measured_ranks" not in runs["one"]
    ranks = runs["two"]["memory_measured_ranks"]
    assert len(ranks) == 2 and all(r["cpu"] > 2**20 for r in ranks)  # each rank's own peak RSS
    row = next(line for line in proc_two_stdout.splitlines() if "ranks, MiB communicated" in line)
    assert row.split("|")[2].strip().startswith("2, ")
    assert [r["sparsity"] for r in runs["two"]["layers"]] == [r["sparsity"] for r in runs["one"]["layers"]]
    from safetensors.torch import load_file

    def weights(run: Path) -> dict:
        return {k: v for f in sorted(run.rglob("*.safetensors")) for k, v in load_file(f).items()}

    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    bounds = _layer_bounds(runs["one"], PruneConfig(sparsity_type="2:4"))
    for key in one:
        assert torch.equal(two[key] == 0, one[key] == 0), key
        assert _rel(two[key], one[key]) <= bounds.get(key.removesuffix(".weight"), 0.0), key


@pytest.mark.slow
def test_torchrun_failing_rank_ends_the_job_with_one_line_and_no_run(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "obsdiff", *PRUNE, "--model", str(tiny_sd3_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path, fault=True), timeout=600)
    assert proc.returncode != 0
    # progress bars on stderr may leave the line our message starts on unfinished
    ours = re.findall(r"error: .*", proc.stderr)
    assert ours == ["error: rank 1 of 2 failed: RuntimeError: injected fault"], proc.stderr[-3000:]
    # torchrun adds its own summary of failed workers (its launcher's ChildFailedError); no obsdiff frame
    assert "/obsdiff/" not in "".join(re.findall(r'File "([^"]+)"', proc.stderr))
    assert not out.exists()


def test_the_plan_is_one_ranks_share(tiny_sd3_dir):
    from click.testing import CliRunner

    from obsdiff.cli import cli
    from obsdiff.planning.planner import plan_memory, skeleton

    sketch, weights = skeleton(str(tiny_sd3_dir), "fp32")
    cached = CalibConfig(**{**CALIB.to_dict(), "mode": "cached", "groups": None})
    plans = {w: plan_memory(sketch, PruneConfig(sparsity=0.5), cached, "cpu", None, weights, world_size=w)
             for w in (1, 2, 3)}
    # four one-prompt batches: 4, 2 and 2 of them on the busiest rank, so the cached block inputs and the
    # denoiser calls per group shrink in proportion; Hessians do not (every rank holds the partial ones)
    assert plans[2].cache_bytes * 2 == plans[1].cache_bytes == plans[3].cache_bytes * 2
    assert [g.calls for g in plans[2].groups] == [g.calls // 2 for g in plans[1].groups]
    assert [g.hessian_bytes for g in plans[2].groups] == [g.hessian_bytes for g in plans[1].groups]
    assert plans[2].world_size == 2

    args = ["prune", "--model", str(tiny_sd3_dir), "--sparsity", "0.5", "--device", "cpu", "--out", "unused"]
    r = CliRunner().invoke(cli, [*args, "--dry-run", "--world-size", "2"])
    assert r.exit_code == 0 and "per rank of 2" in r.output, r.output
    r = CliRunner().invoke(cli, [*args, "--world-size", "2"])
    assert r.exit_code == 2 and "--world-size only plans a torchrun job with --dry-run" in r.output
