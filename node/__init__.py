"""The DICOM node: SCP, SCU, workers, scheduler, result objects, settings and CLI."""

from cascade._version import __version__

__all__ = ["__version__"]
