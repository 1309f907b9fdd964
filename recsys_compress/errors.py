"""User-facing errors: each names the config key or file at fault and how to fix it."""


class RecsysCompressError(Exception):
    """Base class for errors caused by user input; the CLI prints the message and exits non-zero."""


class ConfigError(RecsysCompressError, ValueError):
    """An invalid config value. The message names the key (e.g. ``data.min_user_interactions``)."""


class DataError(RecsysCompressError, ValueError):
    """A missing, corrupt or unusable data file. The message names the file and what to do."""


class RunDirInUseError(ConfigError):
    """The run directory already holds a completed run that this run would overwrite.

    Raised before anything is written: the existing ``results.json`` stays as it is.
    """


class OutputWriteError(RecsysCompressError):
    """A result file (results.json, model.pt, artifact) could not be written, e.g. a full disk.

    The write was atomic: the previous version of the file, if any, is intact.
    """


class KernelCompileError(RecsysCompressError, RuntimeError):
    """A setting asked for a ``torch.compile`` kernel that this machine cannot build (no C++
    compiler or Python headers on CPU, no Triton on CUDA). The message names the key and the
    eager setting that runs without one."""
