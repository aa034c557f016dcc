"""Errors the user can act on. The CLI prints them as one line and exits with code 2."""


class ObsdiffError(Exception):
    """Base class: the message is one line that names the bad value and says what to do."""

    exit_code = 2


class ModelLoadError(ObsdiffError):
    """`--model` is not something obsdiff can load (missing path, hub id, not a pipeline, corrupt file)."""


class UnsupportedModelError(ObsdiffError):
    """The pipeline's denoiser belongs to no registered model family."""


class ConfigError(ObsdiffError):
    """An option or a combination of options is invalid."""


class MissingDependencyError(ObsdiffError):
    """An optional package is needed for this command and is not installed."""


class OutputExistsError(ObsdiffError):
    """The output path exists and `--force` was not given."""



class Interrupted(ObsdiffError):
    """The user stopped a long command (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130
