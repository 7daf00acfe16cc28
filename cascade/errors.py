"""The error hierarchy of calcnode.

Every error that calcnode raises on purpose derives from :class:`CalcnodeError`, so
a caller (the CLI, a worker, the C-STORE handler) can tell an expected failure with
a clear message from a bug. ``storage`` keeps its own root
(:class:`storage.errors.StorageError`) because it may not import ``cascade``; the
node maps both.
"""

from __future__ import annotations

__all__ = [
    "CalcnodeError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "InvalidImageError",
    "TrainingError",
]


class CalcnodeError(Exception):
    """Base class of all errors calcnode raises deliberately."""


class InvalidImageError(CalcnodeError):
    """A dataset or file is not a readable mammogram; the message says what is wrong."""


class ConfigError(CalcnodeError):
    """The configuration is invalid; the message names the key and where it came from."""


class DatasetError(CalcnodeError):
    """A manifest or annotation file is malformed or inconsistent."""


class CheckpointError(CalcnodeError):
    """A checkpoint cannot be loaded or does not describe a model we can rebuild."""


class TrainingError(CalcnodeError):
    """Training cannot go on (non-finite loss, empty data set, bad configuration)."""
