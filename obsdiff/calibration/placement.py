"""Where things sit while a group calibrates: the Hessian and cache devices a `CalibConfig` names, and the
pipeline's other components parked on the host while the denoiser calibrates on an accelerator."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from obsdiff.devices import empty_cache
from obsdiff.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def usable_device(name: str | None, default: torch.device, option: str) -> torch.device:
    """`name` as a usable torch device (None: `default`); a ConfigError if this machine has no such device."""
    if name is None:
        return default
    device = torch.device(name)  # the spelling was validated by CalibConfig
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"{option} {name!r} is not usable on this machine ({first_line(exc)}); use cpu or the "
                          "model's device") from None
    return device


@contextlib.contextmanager
def text_encoders_parked(model):
    """Text encoders (and every other component but the denoiser and the VAE) on the host while the denoiser
    calibrates on an accelerator; back where they were afterwards. A no-op on the CPU.

    The VAE stays: it is small, and some pipelines (Flux, SDXL) take their execution device from it.
    """
    pipeline = model.pipeline
    denoiser = model.denoiser
    if denoiser.device.type == "cpu" or not hasattr(pipeline, "components"):
        yield
        return
    moved = {}
    for name, comp in pipeline.components.items():
        if isinstance(comp, nn.Module) and comp is not denoiser and name != "vae":
            device = next(iter(comp.parameters()), torch.empty(0)).device
            if device.type != "cpu":
                moved[name] = device
                comp.to("cpu")
    if moved:
        log.info("parked %s on the CPU during calibration", ", ".join(moved))
        for device in set(moved.values()):
            empty_cache(device)  # hand the freed blocks back, so the Hessians can use them
    try:
        yield
    finally:
        for name, device in moved.items():
            pipeline.components[name].to(device)
