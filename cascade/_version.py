"""The installed distribution's version, shared by every package of calcnode."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calcnode")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
