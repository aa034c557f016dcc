"""Calibration passes: the real diffusers pipeline over prompts x denoising steps, latents only.

Prompts are encoded once (`encode_batches`) and every pass reuses the embeddings; passes return latents
and never run the VAE decoder. Image i of a pass starts from the noise of seed `seed + i`, so every
group-wise pass sees the same initial latents.

Two calibrators fill Hessians for a group of linears (docs/method.md#group-wise-sequential-calibration):
- `Calibrator` ("rerun", the paper's method): each group re-runs the whole pipeline on the current model,
  so later denoising steps follow the trajectory of the partly pruned model.
- `CachedCalibrator` ("cached", SparseGPT-style): one pipeline run caches the inputs of the first selected
  block for every (prompt batch, step); each group then runs only its own blocks on those inputs, which are
  carried forward through pruned blocks. The trajectory stays the dense model's. A cache that does not fit
  in memory spills to a file in the prune's working directory (`caches`).

Both stop a pipeline call in its last step once every hook of the group has fired (the rest of that step
only computes output latents, which calibration never reads). Calibrators are context managers: `close()`
deletes a spilled cache.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from obsdiff.calibration.caches import MemoryCache, SpillCache
from obsdiff.calibration.hooks import CallCut, HessianHooks, InputCapture, LastStepCut, StepCounter, StopPass
from obsdiff.calibration.placement import usable_device
from obsdiff.calibration.prompts import calibration_prompts
from obsdiff.calibration.ranges import ActivationRanges
from obsdiff.config import CalibConfig, PruneConfig
from obsdiff.devices import available_bytes, synchronize, tensor_bytes
from obsdiff.errors import ConfigError, UnsupportedModelError
from obsdiff.models import Block
from obsdiff.runs.loading import LoadedModel
from obsdiff.solver.hessian import HessianAccumulator, timestep_weights

log = logging.getLogger(__name__)


@dataclass
class CalibBatch:
    embeddings: dict[str, torch.Tensor]
    seeds: list[int]


def encode_batches(model: LoadedModel, prompts: list[str], calib: CalibConfig, rank: int = 0, world_size: int = 1
                   ) -> list[CalibBatch]:
    """Encode the calibration prompts once, in batches of `calib.batch_size`.

    In a distributed prune, rank r takes batches r, r + world_size, ...; a batch's seeds do not depend on who
    runs it, so the union over ranks is the single-process set.
    """
    msl = model.generation_defaults.get("max_sequence_length")
    batches = []
    for start in list(range(0, len(prompts), calib.batch_size))[rank::world_size]:
        chunk = prompts[start:start + calib.batch_size]
        emb = model.family.encode_prompts(model.pipeline, chunk, calib.guidance, msl)
        batches.append(CalibBatch(emb, [calib.seed + start + i for i in range(len(chunk))]))
    return batches


@torch.no_grad()
def run_pass(model: LoadedModel, batches: list[CalibBatch], calib: CalibConfig, counter: StepCounter,
             desc: str = "calibrate", progress: bool = True) -> None:
    """One calibration pass over all batches; hooks registered by the caller see every denoiser call.

    A hook may raise `StopPass` when the rest of a pipeline call is not needed: the pass goes on with the
    next batch.
    """
    pipe = model.pipeline
    device = model.denoiser.device
    size = {k: model.generation_defaults[k] for k in ("height", "width") if k in model.generation_defaults}
    size |= {k: v for k, v in (("height", calib.height), ("width", calib.width)) if v is not None}
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        counter.reset()
        gens = [torch.Generator(device=device).manual_seed(s) for s in batch.seeds]
        with contextlib.suppress(StopPass):
            pipe(**batch.embeddings, **size, num_inference_steps=calib.steps, guidance_scale=calib.guidance,
                 generator=gens, output_type="latent", callback_on_step_end=counter.on_step_end)


# ------------------------------------------------------------------------------------------ calibrators


class Calibrator:
    """Encodes the calibration prompts once, then runs hooked passes that fill Hessians for given linears.

    `sync_timing`: synchronise the accelerator around timed sections so that `stats()`'s split of the time
    is real (costs speed; on the CPU the split is always real). `rank`/`world_size`: this process's share of the
    prompt batches in a distributed prune (`obsdiff.pruning.distributed`); its Hessians are partial until reduced.
    """

    mode = "rerun"

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig, progress: bool = True,
                 sync_timing: bool = False, rank: int = 0, world_size: int = 1):
        self.model, self.calib, self.progress, self.sync_timing = model, calib, progress, sync_timing
        self.device = model.denoiser.device
        self.hessian_device = usable_device(calib.hessian_device, self.device, "--hessian-device")
        t0 = time.perf_counter()
        self.batches = encode_batches(model, calibration_prompts(calib, model.builtin), calib, rank, world_size)
        self.encode_seconds = time.perf_counter() - t0
        self.weights = timestep_weights(calib.timestep_weighting, calib.steps, calib.alpha_min, calib.alpha_max)
        self.dtype = torch.float64 if prune.compute_dtype == "fp64" else torch.float32
        self.modules = dict(model.denoiser.named_modules())
        self.calib_seconds = 0.0  # all pipeline passes and sweeps
        self.hessian_seconds = 0.0  # inside the hooks' accumulation
        self.io_seconds = 0.0  # cached mode: reading and writing cached block inputs
        self.passes = 0  # pipeline runs

    def stats(self) -> dict:
        """What the report records about calibration beyond the group timings (seconds summed over groups;
        `forward_seconds`: everything but the Hessian accumulation and cache I/O, i.e. denoiser forwards)."""
        return {"mode": self.mode, "pipeline_runs": self.passes,
                "forward_seconds": max(self.calib_seconds - self.hessian_seconds - self.io_seconds, 0.0),
                "hessian_seconds": self.hessian_seconds, "hessian_device": str(self.hessian_device)}

    def close(self) -> None:
        """Release what the calibrator holds on disk (nothing in rerun mode)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accumulators(self, linears: list[str], ranges: dict[str, list[str]] | None = None
                      ) -> dict[str, HessianAccumulator]:
        accs = {name: HessianAccumulator(self.modules[name].in_features, self.hessian_device, self.dtype,
                                         self.calib.max_tokens, seed=self.calib.seed + i)
                for i, name in enumerate(linears)}
        for name, outputs in (ranges or {}).items():
            accs[name].ranges = ActivationRanges([self.modules[o] for o in outputs])
        return accs

    def _hooks(self, counter: StepCounter, accs: dict[str, HessianAccumulator],
               cut: LastStepCut | CallCut | None = None) -> HessianHooks:
        hooks = HessianHooks(counter, self.weights, sync=self.sync_timing, cut=cut)
        for name, acc in accs.items():
            hooks.watch(self.modules[name], acc)
        return hooks

    def hessians(self, linears: list[str], desc: str, ranges: dict[str, list[str]] | None = None
                 ) -> tuple[dict[str, HessianAccumulator], float]:
        """One pass over the current model; returns an accumulator per linear (by name) and the seconds.

        `ranges`: hooked linear -> the linears whose output ranges to record too; those hooked linears' accumulators
        carry the activation ranges of the same pass (`acc.ranges`)."""
        t0 = time.perf_counter()
        counter = StepCounter()
        accs = self._accumulators(linears, ranges)
        with self._hooks(counter, accs, LastStepCut(counter)) as hooks:
            run_pass(self.model, self.batches, self.calib, counter, desc=desc, progress=self.progress)
        self.passes += 1
        self.hessian_seconds += hooks.seconds
        seconds = time.perf_counter() - t0
        self.calib_seconds += seconds
        return accs, seconds


class CachedCalibrator(Calibrator):
    """Hessians from cached block inputs: the pipeline runs once, then groups run only their own blocks.

    Holds the inputs of one block, the *frontier*, for every denoiser call of the capture pass, computed
    through the current (pruned) weights of the blocks before it. A group's Hessians come from running its
    blocks on the frontier inputs after moving the frontier up to its first block. Groups must be asked for
    in forward order, as the prune loop does; asking for an earlier block (a second sweep, like the
    sensitivity allocation followed by the prune) captures again. A capture that `hessians` starts
    records the inputs of the group's first block and accumulates the group's Hessians in the same
    pipeline run.

    The cache lives on `calib.cache_device`; with `workdir` (the prune's staging directory) it spills to a
    file there when it would not fit in that device's free memory (`calib.cache_spill`).
    """

    mode = "cached"

    def __init__(self, model: LoadedModel, prune: PruneConfig, calib: CalibConfig, blocks: list[Block],
                 progress: bool = True, workdir: Path | None = None, sync_timing: bool = False, rank: int = 0,
                 world_size: int = 1):
        if calib.cache_spill == "always" and workdir is None:
            raise ConfigError("--cache-spill always needs a working directory to spill to (the prune's --out; "
                              "in a distributed prune, rank 0's only); use --cache-spill auto")
        super().__init__(model, prune, calib, progress, sync_timing, rank, world_size)
        self.family = model.family
        self.blocks = blocks
        self.block_of = block_positions(blocks, self.modules)
        self.cache_device = usable_device(calib.cache_device, self.device, "--cache-device")
        self.workdir = Path(workdir) if workdir is not None else None
        self.cache: MemoryCache | SpillCache | None = None
        self.frontier = 0
        self.captures = 0
        self.capture_seconds = 0.0
        self.advance_seconds = 0.0
        self.cache_bytes = 0
        self.cache_location = "memory"

    def stats(self) -> dict:
        return super().stats() | {
            "captures": self.captures, "capture_seconds": self.capture_seconds,
            "advance_seconds": self.advance_seconds, "io_seconds": self.io_seconds, "cache_bytes": self.cache_bytes,
            "cache_calls": len(self.cache or ()), "cache_device": str(self.cache_device),
            "cache_location": self.cache_location}

    def close(self) -> None:
        """Drop the cache; a spilled one's file is deleted."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def capture(self, block: int = 0, accs: dict[str, HessianAccumulator] | None = None) -> None:
        """One pipeline run over the model as it is now, caching the inputs of `blocks[block]` (the new frontier).

        With `accs`, the hooks of those accumulators fill them in the same run.
        """
        t0 = time.perf_counter()
        self.close()  # free the old cache before filling a new one
        counter = StepCounter()
        cut = LastStepCut(counter)
        calls = len(self.batches) * self.calib.steps  # one denoiser call per step (CFG rows share it)
        store: list = []

        def open_store(kwargs: dict) -> None:
            store.append(self._open_cache(calls, tensor_bytes(kwargs)))

        def sink(kwargs: dict, step: int) -> None:
            t1 = time.perf_counter()
            store[0].append(kwargs, step)
            self.io_seconds += time.perf_counter() - t1

        hooks = self._hooks(counter, accs or {}, cut)
        try:
            with hooks, InputCapture(self.blocks[block].module, counter, on_first=open_store, sink=sink, cut=cut):
                run_pass(self.model, self.batches, self.calib, counter, desc="capture block inputs",
                         progress=self.progress)
        except BaseException:
            if store:
                store[0].close()
            raise
        self.passes += 1
        self.hessian_seconds += hooks.seconds
        # a rank of a distributed prune may have no batch of its own (fewer batches than ranks)
        self.cache, self.frontier = (store[0] if store else MemoryCache(self.cache_device)), block
        self.cache_bytes = max(self.cache_bytes, self.cache.nbytes)
        self.cache_location = self.cache.location
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        self.calib_seconds += time.perf_counter() - t0

    def _open_cache(self, calls: int, per_call: int) -> MemoryCache | SpillCache:
        """Where this capture's block inputs go: memory of the cache device if they fit, else a spill file."""
        spill = self.calib.cache_spill
        need, free = calls * per_call, available_bytes(self.cache_device)
        fits = free is None or need <= 0.9 * free
        if spill == "always" or (not fits and spill == "auto" and self.workdir is not None):
            disk = shutil.disk_usage(self.workdir).free
            if need <= 0.9 * disk:
                if not fits:
                    log.info("block inputs (%.1f GiB) do not fit in %s: spilling to %s", need / 2**30,
                             self.cache_device, self.workdir)
                return SpillCache(self.workdir, need)
            if spill == "always":
                raise ConfigError(f"cached calibration would spill {need / 2**30:.1f} GiB of block inputs but "
                                  f"{self.workdir} has {disk / 2**30:.1f} GiB free; free disk space or use "
                                  "--cache-spill auto")
            fits = False
        if not fits:
            where = f"{self.cache_device} has {free / 2**30:.1f} GiB free"
            if self.workdir is not None and spill == "auto":
                where += f" and {self.workdir} {shutil.disk_usage(self.workdir).free / 2**30:.1f} GiB"
            raise ConfigError(
                f"cached calibration would keep {need / 2**30:.1f} GiB of block inputs ({calls} calls x "
                f"{per_call / 2**20:.0f} MiB) but {where}; use --cache-device cpu, fewer --num-prompts or "
                "--steps, or --calibration-mode rerun")
        return MemoryCache(self.cache_device)

    @torch.no_grad()
    def _run_blocks(self, start: int, stop: int, kwargs: dict) -> dict:
        """Blocks [start, stop) on one call's inputs (on the model's device); returns the inputs of block `stop`."""
        for block in self.blocks[start:stop]:
            kwargs = self.family.next_block_inputs(block.module(**kwargs), kwargs)
        return kwargs

    def hessians(self, linears: list[str], desc: str, ranges: dict[str, list[str]] | None = None
                 ) -> tuple[dict[str, HessianAccumulator], float]:
        """Move the frontier up to the group's first block, then run the group's blocks with hooks.

        Both happen in one sweep over the cached calls, so each call's inputs travel to the model's device
        once (the advance only runs blocks before the hooked ones, which no hook sees). Without a usable
        cache, the capture run itself fills the Hessians.
        """
        t0 = time.perf_counter()
        outside = [n for n in linears if n not in self.block_of]
        if outside:
            raise ConfigError(f"layer {outside[0]} is outside the selected blocks; cached calibration covers "
                              "--blocks only")
        first = min(self.block_of[n] for n in linears)
        last = max(self.block_of[n] for n in linears)
        accs = self._accumulators(linears, ranges)
        if self.cache is None or first < self.frontier:
            self.capture(first, accs)
        else:
            self._sweep(first, last, accs, desc)
        return accs, time.perf_counter() - t0

    def _sweep(self, first: int, last: int, accs: dict[str, HessianAccumulator], desc: str) -> None:
        t0 = time.perf_counter()
        start, advancing = self.frontier, self.frontier < first
        counter = StepCounter()
        cache = self.cache
        cut = CallCut()  # the hooked blocks' output is not needed: stop at their last hook
        with self._hooks(counter, accs, cut) as hooks:
            for i in tqdm(range(len(cache)), desc=desc, unit="call", leave=False, disable=not self.progress):
                t1 = time.perf_counter()
                kwargs, step = cache.read(i, self.device)
                self.io_seconds += time.perf_counter() - t1
                if advancing:
                    t1 = time.perf_counter()
                    kwargs = self._run_blocks(start, first, kwargs)
                    t2 = time.perf_counter()
                    cache.write(i, kwargs)
                    self._sync()
                    t3 = time.perf_counter()
                    self.advance_seconds += t2 - t1
                    self.io_seconds += t3 - t2
                counter.step = step
                cut.start()
                with contextlib.suppress(StopPass):
                    self._run_blocks(first, last + 1, kwargs)
                cut.finish()
        self.hessian_seconds += hooks.seconds
        self.frontier = first
        self.calib_seconds += time.perf_counter() - t0

    def _sync(self) -> None:  # only when asked to measure: the advance's share of the time on an accelerator
        if self.sync_timing and self.device.type != "cpu":
            synchronize(self.device)


def block_positions(blocks: list[Block], names) -> dict[str, int]:
    """{dotted module name: position in `blocks`} for the names that lie inside one of the blocks."""
    return {name: i for i, b in enumerate(blocks) for name in names if name.startswith(b.name + ".")}


def make_calibrator(model: LoadedModel, prune: PruneConfig, calib: CalibConfig, blocks: list[Block],
                    progress: bool = True, workdir: Path | None = None, sync_timing: bool = False, rank: int = 0,
                    world_size: int = 1) -> Calibrator:
    """The calibrator of `calib.mode` over the selected `blocks` (forward order), for rank `rank`'s share.

    `workdir`: where cached mode may spill its block inputs (the prune's staging directory). Cached mode is
    refused before any prompt is encoded for families whose denoiser is not a chain of blocks.
    """
    if calib.mode == "rerun":
        return Calibrator(model, prune, calib, progress, sync_timing, rank, world_size)
    if not model.family.chains_blocks:
        raise UnsupportedModelError(f"the {model.family.name} denoiser is not a plain chain of blocks, so block "
                                    "inputs cannot be cached; use --calibration-mode rerun")
    return CachedCalibrator(model, prune, calib, blocks, progress, workdir, sync_timing, rank, world_size)
