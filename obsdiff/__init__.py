"""obsdiff: one-shot OBS-Diff pruning of text-to-image diffusion denoisers, and deployment tooling.

The public API is importable from the package root; heavy modules load on first use:

    import obsdiff
    result = obsdiff.run_prune("builtin:digits", obsdiff.PruneConfig(sparsity=0.5), obsdiff.CalibConfig(),
                               "runs/digits-50")  # all of `obsdiff prune`: plan, checkpoint, resume, save

    model = obsdiff.load_pipeline("builtin:digits")  # or step by step, in memory
    report = obsdiff.prune_(model, obsdiff.PruneConfig(sparsity=0.5), obsdiff.CalibConfig())
    obsdiff.save_run(model, report.to_dict(), "runs/digits-50-in-memory")

    # 2:4 and INT8 in one OBS pass
    obsdiff.run_prune("builtin:digits", obsdiff.PruneConfig(sparsity_type="2:4", quant=obsdiff.QuantConfig("w8a8")),
                      obsdiff.CalibConfig(), "runs/digits-24-w8a8")
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_pipeline": "obsdiff.runs.loading",
    "LoadedModel": "obsdiff.runs.loading",
    "PruneConfig": "obsdiff.config",
    "CalibConfig": "obsdiff.config",
    "QuantConfig": "obsdiff.config",
    "prune_": "obsdiff.pruning.prune",
    "PruneReport": "obsdiff.pruning.records",
    "save_run": "obsdiff.runs.io",
    "run_prune": "obsdiff.job",
    "PruneResult": "obsdiff.job",
    "PruneInterrupted": "obsdiff.job",
    "EvalConfig": "obsdiff.eval.evaluate",
    "evaluate": "obsdiff.eval.evaluate",
    "save_report": "obsdiff.eval.evaluate",
    "ObsdiffError": "obsdiff.errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'obsdiff' has no attribute {name!r}")
