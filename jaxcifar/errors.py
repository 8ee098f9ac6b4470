"""Exception types. Every user-facing failure is one of these, with a one-line message naming the
problem and the fix."""


class JaxCifarError(Exception):
    """Base class for all jaxcifar errors. ``cli``: the same message worded for the command line (naming flags
    instead of function arguments), which the experiments print instead."""

    def __init__(self, message: str, *, cli: str | None = None) -> None:
        super().__init__(message)
        self.cli = cli


class DataError(JaxCifarError):
    """The dataset could not be found, read or validated."""


class ConfigError(JaxCifarError, ValueError):
    """A configuration value is invalid; raised before anything compiles."""


class TrainingError(JaxCifarError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class CheckpointError(JaxCifarError):
    """A checkpoint is missing, damaged or does not fit the requested model."""


class OutputError(JaxCifarError):
    """An output directory cannot be used: not writable, not a directory, or in use by another process."""


def warn(message: str) -> None:
    """Print ``warning: <message>`` as one line on stderr (through tqdm, so progress bars stay intact): for
    what jaxcifar repairs or works around by itself (a damaged cache rebuilt, a damaged checkpoint skipped)."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def first_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters: what a one-line
    error or warning quotes of a library's multi-line message."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
