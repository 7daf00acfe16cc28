"""The microcalcification detection cascade (ASN proposals, then FPR), as pure ML code.

Reads data from the way the pipeline runs: ``phantom`` → ``io`` / ``preprocess`` →
``models`` → ``losses`` → ``train`` → ``proposals`` → ``fpr`` → ``detector`` →
``evaluate``. Knows nothing of networking or the job database.
"""

from cascade._version import __version__

__all__ = ["__version__"]
