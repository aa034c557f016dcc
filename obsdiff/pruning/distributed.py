"""Pruning on several processes with torch.distributed, launched by `torchrun` (docs/method.md#distributed-protocol).

Calibration is data-parallel: rank r runs the prompt batches r, r + W, r + 2W, ... (W the world size), so
its accumulator of a linear holds the weighted running mean `H_r` over its own calls with weight sum `S_r`.
The single-process Hessian is `H = sum_r S_r H_r / sum_r S_r`, which `reduce_hessians_` forms on one
*owner* rank per unit (equal to the single-process one up to float summation order).

Solves are layer-parallel: units are given to owners by a greedy bin-packing of their solve cost, each owner
solves its units, and the new weights are broadcast before the next group calibrates, so every group still
sees every earlier group pruned (the group-wise sequential semantics are kept exactly). `share_work` is that
step, for every kind of work item (units, reader components, sensitivity cost curves).

Failures: a rank that raises while computing alone must not leave the others waiting in a collective. Every
such phase runs under `World.failures()`, which ends in an all-gather of each rank's outcome; if any rank
failed, every rank raises, and rank 0's error names the failing rank and its cause.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from obsdiff.errors import ConfigError, ObsdiffError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

# Collectives wait this long for a rank still computing (one group's calibration on a big model can take
# many minutes on one device) before they give up.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("OBSDIFF_DIST_TIMEOUT_MIN", "60")))


class RankFailed(ObsdiffError):
    """Another rank of a distributed prune failed; the message names it and its cause."""


class LostRank(ObsdiffError):
    """A collective failed: another rank died or the network between them broke."""


@dataclass
class RankStats:
    """What one rank spent and sent, for the report."""

    rank: int
    calib_seconds: float = 0.0  # its share of calibration passes (all groups)
    solve_seconds: float = 0.0  # solves of the units it owns
    comm_seconds: float = 0.0  # reductions and broadcasts
    units_solved: int = 0
    bytes_sent: int = 0  # payload of reductions and broadcasts this rank contributed


def launched_by_torchrun(env: dict | None = None) -> bool:
    """True when this process is one rank of a torchrun (or any env:// launcher) job."""
    env = os.environ if env is None else env
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each work item: the costliest item first, to the least loaded rank (ties: lowest rank).

    Pure and deterministic, so every rank computes the same assignment without communicating.
    """
    loads = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


def solve_cost(d_in: int, d_out: int) -> float:
    """Relative cost of one OBS solve: the (d_in x d_in) factorisations plus the column sweep over d_out rows."""
    return float(d_in) ** 2 * (d_in + d_out)


def owners_by_cost(work: Sequence[Sequence[str]], modules: dict, world_size: int) -> list[int]:
    """Owner rank of each work item, an item being the linears (dotted names in `modules`) solved together."""
    return assign_owners([sum(solve_cost(modules[n].in_features, modules[n].out_features) for n in names)
                          for names in work], world_size)


def balance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """Busiest rank's solve cost over the mean (1.0: perfectly balanced)."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners, strict=True):
        loads[r] += c
    mean = sum(loads) / world_size
    return max(loads) / mean if mean else 1.0


@dataclass
class World:
    """This process's place in a distributed prune; `World()` is the single process (every method a no-op)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")  # where collectives run: the rank's accelerator under nccl
    stats: RankStats = field(default_factory=lambda: RankStats(0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence) -> list:
        """This rank's share of `items`: every W-th one, starting at its rank."""
        return list(items[self.rank::self.size])

    # ------------------------------------------------------------------ failures

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Run a phase that computes without collectives; afterwards every rank learns whether any failed."""
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:
            error = exc
        self.agree(error)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed: a rank re-raises its own error, the others `RankFailed`."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        mine = None if error is None else (first_line(error) if isinstance(error, ObsdiffError)
                                           else f"{type(error).__name__}: {first_line(error)}")
        outcomes = self.all_gather(mine)
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if error is not None:
            with contextlib.suppress(AttributeError):  # rank 0 reports it: `session` keeps this rank quiet
                error.obsdiff_agreed = True
            raise error
        if failed:
            rank, message = failed[0]
            others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            raise RankFailed(f"rank {rank} of {self.size} failed{others}: {message}")

    # ------------------------------------------------------------------ collectives

    def _collective(self, fn, *args, **kwargs):
        import torch.distributed as dist

        t0 = time.perf_counter()
        try:
            return getattr(dist, fn)(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # DistBackendError and gloo's connection errors
            raise LostRank(f"rank {self.rank} lost contact with the other ranks during {fn} "
                           f"({first_line(exc)}); another rank probably died: see its log") from None
        finally:
            self.stats.comm_seconds += time.perf_counter() - t0

    def all_gather(self, obj) -> list:
        """`obj` of every rank, in rank order (pickled; for small records only)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        self._collective("all_gather_object", out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        self._collective("broadcast_object_list", box, src=src)
        return box[0]

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Overwrite `tensors` on every rank with rank `src`'s values, in place."""
        if not self.distributed:
            return
        for t in tensors:
            self._collective("broadcast", t.data, src=src)
            if self.rank == src:
                self.stats.bytes_sent += t.numel() * t.element_size() * (self.size - 1)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            self._collective("all_reduce", t)
        return t

    def reduce_ranges_(self, accs: dict) -> None:
        """Make every rank's activation ranges (`acc.ranges`) the maxima over all ranks' calls, per step, in place.

        A maximum is exact in any order, so the ranges equal the single-process ones. A rank that saw no call of
        some step contributes zeros (every range is a maximum of absolute values)."""
        named = sorted(n for n, acc in accs.items() if acc.ranges is not None)
        if not self.distributed or not named:
            return
        seen = self.all_gather({name: accs[name].ranges.steps for name in named})  # one exchange for the group
        for name in named:
            ranges, d_in = accs[name].ranges, accs[name].d_in
            steps = sorted(set().union(*(rank[name] for rank in seen)))
            stacked = torch.stack([ranges.channels.get(k, torch.zeros(d_in)).to(self.device) for k in steps])
            outputs = torch.stack([torch.stack([m.get(k, torch.zeros(())).to(self.device) for k in steps])
                                   for m in ranges.output_max]) if ranges.outputs else None
            for t in (stacked, outputs):
                if t is not None:
                    self._max_(t)
            ranges.channels = dict(zip(steps, stacked.unbind(0), strict=True))
            if outputs is not None:
                ranges.output_max = [dict(zip(steps, row.unbind(0), strict=True)) for row in outputs]

    def _max_(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        self._collective("all_reduce", t, op=dist.ReduceOp.MAX)
        self.stats.bytes_sent += t.numel() * t.element_size()

    def reduce_hessians_(self, accs: dict, owners: dict[str, int]) -> None:
        """Combine every rank's partial accumulators into the full Hessian on each one's owner, in place.

        `accs` (same names on every rank) hold each rank's running means; afterwards the owner's holds the
        single-process Hessian, weight sum, calls and tokens, and the other ranks' accumulators keep their
        counts but release their matrices.
        """
        if not self.distributed:
            return
        names = list(accs)
        counts = torch.tensor([[accs[n].weight_sum, accs[n].calls, accs[n].tokens] for n in names],
                              dtype=torch.float64, device=self.device)
        totals = self.all_reduce_(counts)
        for name, (weight_sum, calls, tokens) in zip(names, totals.tolist(), strict=True):
            acc, owner = accs[name], owners[name]
            H = acc.H  # symmetric (a wide input's upper triangle is filled first)
            H.mul_(acc.weight_sum)  # back to the weighted sum sum_c 2 alpha_c X_c^T X_c of this rank's calls
            device = H.device
            H = H.to(self.device)  # Hessians kept on the host (--hessian-device cpu) travel through the accelerator
            self._collective("reduce", H, dst=owner)
            if self.rank != owner:
                self.stats.bytes_sent += H.numel() * H.element_size()
            if self.rank == owner:
                acc.merge(H.to(device).div_(weight_sum) if weight_sum else H.to(device).zero_(), weight_sum,
                          int(calls), int(tokens))
            else:
                acc.release(weight_sum, int(calls), int(tokens))

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A command's whole run on this rank: the process group is left at the end, and on a failure only
        rank 0 speaks for a failure every rank knows of (another rank exits quietly with the same code);
        a failure only this rank knows of is reported by it, naming the rank."""
        import click

        failed = True
        try:
            yield
            failed = False
        except click.exceptions.Exit:
            failed = False
            raise
        except BaseException as exc:
            if not self.distributed or self.is_main:
                raise
            code = getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 2)
            if getattr(exc, "obsdiff_agreed", False) or isinstance(exc, RankFailed | KeyboardInterrupt):
                log.debug("rank %d stops: %s", self.rank, first_line(exc))
                raise click.exceptions.Exit(code) from None
            raise RankFailed(f"rank {self.rank} of {self.size}: {first_line(exc)}") from exc
        finally:
            self.close(together=not failed)

    def close(self, together: bool = True) -> None:
        """Leave the process group; `together`: first wait for every rank (not after a failure, where another
        rank may never come)."""
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                return
            if together:  # a rank tearing its connections down while another still reads them can abort gloo
                with contextlib.suppress(Exception):
                    dist.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def record(self) -> dict:
        """What the report keeps about the job: world size, backend, and every rank's seconds and bytes."""
        ranks = self.all_gather(asdict(self.stats))
        return {"world_size": self.size, "backend": self.backend, "ranks": ranks,
                "bytes_communicated": sum(r["bytes_sent"] for r in ranks)}


def share_work(world: World, work: Sequence[Sequence[str]], modules: dict, solve: Callable[[int], T],
               tensors_of: Callable[[int], Sequence[torch.Tensor]] | None = None, accs: dict | None = None,
               desc: str = "solve", progress: bool = False) -> list[T]:
    """Run `solve(i)` for every work item on its owner rank and give every rank every result, in item order.

    Item i is the linears `work[i]` solved together: their cost picks the owner (`owners_by_cost`), and
    their partial Hessians in `accs` (by linear name) are reduced to that owner first. Solves run under
    `failures()`; afterwards each owner broadcasts what its items changed in place (`tensors_of(i)`) and the
    results (small, pickled) are all-gathered. The one place where prune work is shared between ranks.
    """
    owners = owners_by_cost(work, modules, world.size)
    if accs:
        world.reduce_ranges_(accs)
        world.reduce_hessians_(accs, {name: owner for names, owner in zip(work, owners, strict=True)
                                      for name in names})
    mine: dict[int, T] = {}
    t0 = time.perf_counter()
    with world.failures():
        for i in tqdm([i for i, o in enumerate(owners) if o == world.rank], desc=desc, unit="unit", leave=False,
                      disable=not progress):
            mine[i] = solve(i)
    world.stats.solve_seconds += time.perf_counter() - t0
    world.stats.units_solved += len(mine)
    if tensors_of is not None:
        for i, owner in enumerate(owners):
            world.broadcast_(list(tensors_of(i)), src=owner)
    results = {i: r for part in world.all_gather(mine) for i, r in part.items()}
    return [results[i] for i in range(len(work))]


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the torchrun job this process belongs to (nccl on CUDA, gloo otherwise), one device per rank.

    Outside torchrun: the single-process world and `device` unchanged. On CUDA every rank uses
    `cuda:LOCAL_RANK`; an explicit other index is refused, as it would put several ranks on one device.
    """
    if not launched_by_torchrun():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if size == 1:
        return World(), device
    import torch.distributed as dist

    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ConfigError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device "
                              "cuda")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} has LOCAL_RANK {local_rank} but this machine has "
                              f"{torch.cuda.device_count()} CUDA devices; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"--device {device} is not supported with torchrun; use cuda or cpu")
    try:
        dist.init_process_group(backend, timeout=TIMEOUT, rank=rank, world_size=size)
    except (RuntimeError, ValueError) as exc:
        raise LostRank(f"rank {rank} could not join the torchrun job at {os.environ['MASTER_ADDR']}:"
                       f"{os.environ['MASTER_PORT']} ({first_line(exc)}); check --rdzv-endpoint and that every "
                       "node runs the same command") from None
    comm_device = device if backend == "nccl" else torch.device("cpu")
    return World(rank, size, local_rank, backend, comm_device, RankStats(rank)), device
