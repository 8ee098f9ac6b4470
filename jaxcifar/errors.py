"""Exception types. Every user-facing failure is one of these, with a one-line message naming the
problem and the fix."""


class JaxCifarError(Exception):
    """Base class for all jaxcifar errors."""


class DataError(JaxCifarError):
    """The dataset could not be found, read or validated."""


class ConfigError(JaxCifarError, ValueError):
    """A configuration value is invalid; raised before anything compiles."""


class TrainingError(JaxCifarError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class CheckpointError(JaxCifarError):
    """A checkpoint is missing or does not fit the requested model."""
