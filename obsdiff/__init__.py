"""obsdiff: one-shot OBS-Diff pruning of text-to-image diffusion denoisers, and deployment tooling."""

__version__ = "0.1.0"
