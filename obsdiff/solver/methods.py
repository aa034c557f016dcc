"""The pruning methods, in one registry: what each one needs, and how it prunes one linear.

Everything that differs between OBS-Diff and its baselines is declared here; `config`, `prune`,
`structured` and the planner ask a method's `Method` record instead of comparing its name:

- `hessian`: what the method reads from calibration: "full" (the OBS solve needs H), "diag" (Wanda's
  input norms, diag(H)) or None (weights alone: no calibration at all);
- `compensation`: whether kept weights are updated to absorb the error (OBS), so `--no-compensate` means
  something;
- `step_weighting`: a timestep weighting the method always uses (None: `--timestep-weighting` applies);
- `one_group_modes`: calibration modes in which the method calibrates in a single group (SparseGPT's
  original one-pass schedule in rerun mode; Wanda, which never updates weights, in every mode);
- `structured`: how it scores heads and FFN neurons for `--sparsity-type structured`: "obs" (block OBS
  cost, with compensation), "l1" (weight norms), or None (no structured variant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from obsdiff.errors import ConfigError
from obsdiff.solver import obs

# (W [out, in] in the compute dtype, H [in, in] or None, sparsity or None for N:M, the PruneConfig: it reads nm,
# block_size, percdamp, compensate; config.py imports this module, so not typed here) -> (W', damping used)
Solve = Callable[[torch.Tensor, "torch.Tensor | None", "float | None", Any], "tuple[torch.Tensor, float | None]"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    solve: Solve
    hessian: str | None  # "full", "diag" or None (see the module docstring)
    compensation: bool
    step_weighting: str | None = None
    one_group_modes: tuple[str, ...] = ()
    structured: str | None = None  # "obs", "l1" or None

    @property
    def calibration(self) -> bool:
        """Whether the method runs the pipeline to collect Hessians at all."""
        return self.hessian is not None


METHODS: dict[str, Method] = {}


def register_method(name: str, description: str, **needs) -> Callable[[Solve], Solve]:
    """Register the decorated solve function as method `name` with what it `needs` (`Method` fields)."""

    def add(solve: Solve) -> Solve:
        METHODS[name] = Method(name, description, solve, **needs)
        return solve

    return add


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


# decorators apply bottom-up: obs-diff, the default, registers (and is listed) first
@register_method("sparsegpt", "OBS with uniform step weights, calibrated once (rerun mode)",
                 hessian="full", compensation=True, step_weighting="uniform", one_group_modes=("rerun",),
                 structured="obs")
@register_method("obs-diff", "OBS with timestep-weighted Hessians, group-wise sequential calibration",
                 hessian="full", compensation=True, structured="obs")
def _obs_solve(W, H, sparsity, cfg):
    res = obs.obs_prune(W, H, sparsity, cfg.nm, cfg.block_size, cfg.percdamp, cfg.compensate)
    return res.weight, res.damp


@register_method("wanda", "|W| x input norm, no weight update, calibrated once",
                 hessian="diag", compensation=False, step_weighting="uniform", one_group_modes=("rerun", "cached"))
def _wanda_solve(W, H, sparsity, cfg):
    return W.masked_fill(obs.wanda_mask(W, torch.diag(H), sparsity, cfg.nm), 0.0), None


@register_method("magnitude", "|W| alone, no calibration (structured: L1 norms of heads and neurons)",
                 hessian=None, compensation=False, structured="l1")
def _magnitude_solve(W, H, sparsity, cfg):
    return W.masked_fill(obs.magnitude_mask(W, sparsity, cfg.nm), 0.0), None
