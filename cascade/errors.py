"""The errors the cascade raises on purpose.

Every one derives from :class:`CascadeError`, so a caller (the CLI, a worker) can tell
an expected failure with a clear message from a bug. ``cascade`` is pure ML and knows
nothing of the node: ``storage`` keeps its own root
(:class:`storage.errors.StorageError`), the node its own
(:class:`node.errors.CalcnodeError`), and the node maps all three.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CascadeError",
    "CheckpointError",
    "DatasetError",
    "DeviceError",
    "InvalidImageError",
    "TrainingError",
]


class CascadeError(Exception):
    """Base class of all errors the cascade raises deliberately."""


class InvalidImageError(CascadeError):
    """A dataset or file is not a readable mammogram; the message says what is wrong."""


class DatasetError(CascadeError):
    """A manifest or annotation file is malformed or inconsistent."""


class CheckpointError(CascadeError):
    """A checkpoint cannot be loaded or does not describe a model we can rebuild."""


class DeviceError(CascadeError):
    """The requested compute device does not exist on this machine."""


class CalibrationError(CascadeError):
    """An operating point cannot be chosen (bad target or threshold, no validation images)."""


class TrainingError(CascadeError):
    """Training cannot go on (non-finite loss, empty data set, bad configuration)."""
