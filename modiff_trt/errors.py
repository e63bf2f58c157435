"""Exceptions the CLI turns into one clear message (file + fix) instead of a traceback."""


class ModiffError(Exception):
    """A user-facing error: the message names the file involved and how to fix it."""


class CheckpointError(ModiffError):
    """A checkpoint is missing, corrupt, untrusted or does not fit the config."""


class ConfigError(ModiffError):
    """A model or quantization config is missing or invalid."""


class ArtifactError(ModiffError):
    """An export directory, calibration file or engine is missing, corrupt or mismatched."""


class BackendUnavailableError(ModiffError):
    """A runtime (TensorRT, CUDA, onnxruntime-gpu) is not installed or sees no device."""


class OptionError(ModiffError, ValueError):
    """An option is out of range, contradicts another, or cannot apply to what it is given.

    Also a ValueError, so library callers that guard numeric arguments keep catching it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's text: runtimes append pages of context that
    would break the CLI's one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
