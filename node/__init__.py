"""The DICOM node: SCP, SCU, workers, scheduler, result objects, settings and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The installed distribution's version (Software Versions of every object we send).
    __version__ = version("calcnode")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
