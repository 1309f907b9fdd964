"""User-facing errors: each names the config key or file at fault and how to fix it."""


class RecsysCompressError(Exception):
    """Base class for errors caused by user input; the CLI prints the message and exits non-zero."""


class ConfigError(RecsysCompressError, ValueError):
    """An invalid config value. The message names the key (e.g. ``data.min_user_interactions``)."""


class DataError(RecsysCompressError, ValueError):
    """A missing, corrupt or unusable data file. The message names the file and what to do."""
