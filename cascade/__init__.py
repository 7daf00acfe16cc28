"""The microcalcification detection cascade (ASN proposals, then FPR), as pure ML code.

The sub-packages follow the data (``docs/architecture.md``):

``synthesis``  phantom mammograms with their ground truth
``data``       DICOM → pixels, preprocessing, manifests, training patches
``models``     the U-Net (ASN) and the ResNet-50 (FPR), self-describing checkpoints
``training``   losses, the ASN and FPR training loops, presets
``inference``  proposals, FPR scoring, the detector, the weights it runs
``evaluation`` FROC with the 1-mm rule, the operating point

Knows nothing of networking or the job database; nothing outside ``training``
imports ``training``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The installed distribution's version (recorded in checkpoints and phantoms).
    __version__ = version("calcnode")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
