"""Who made a result object: stable UIDs and the provenance written into every object.

The model's identity (checkpoint digests and operating point) is the cascade's
(:class:`cascade.inference.weights.ModelIdentity`); this module turns it into DICOM: the
Device UID, the Algorithm Name and Version, and the series UIDs that keep every version
of a study's report in one series per output kind.
"""

from __future__ import annotations

import hashlib

from cascade.inference.weights import ModelIdentity
from node import __version__
from node.reports.common import Provenance

__all__ = [
    "ALGORITHM_NAME",
    "derived_uid",
    "device_uid_for",
    "make_provenance",
    "provenance_for",
    "series_uid_for",
]

#: Algorithm Name (TID 4019) of every result object.
ALGORITHM_NAME = "calcnode uC cascade"


def derived_uid(*parts: str) -> str:
    """A stable UID under the ``2.25`` root from the first 128 bits of a SHA-256.

    The same ``parts`` always give the same UID (≤ 44 characters), e.g. one series per
    study and output kind, so every version of a report lands in the same series.
    """
    if not parts or not all(isinstance(p, str) for p in parts):
        raise TypeError("parts must be one or more str")
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def device_uid_for(model_sha256: str) -> str:
    """The Device UID of a trained model: ``2.25.`` + the int of its sha256's first 128 bits.

    Parameters
    ----------
    model_sha256 : str
        64 hex digits identifying the model's weights.

    Raises
    ------
    ValueError
        ``model_sha256`` is not 64 hex digits.
    """
    if not isinstance(model_sha256, str) or len(model_sha256) != 64:
        raise ValueError(f"model_sha256 must be 64 hex digits, got {model_sha256!r}")
    try:
        value = int(model_sha256[:32], 16)
    except ValueError:
        raise ValueError(f"model_sha256 must be 64 hex digits, got {model_sha256!r}") from None
    return f"2.25.{value}"


def series_uid_for(study_instance_uid: str, kind: str) -> str:
    """The Series Instance UID of one output kind in one study (stable across versions)."""
    return derived_uid("calcnode-series", study_instance_uid, kind)


def make_provenance(*, model_version: str, model_sha256: str) -> Provenance:
    """The :class:`Provenance` of objects made by the given model with this calcnode."""
    return Provenance(
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=__version__,
        model_version=model_version[:64] or model_sha256[:12],
        device_uid=device_uid_for(model_sha256),
    )


def provenance_for(identity: ModelIdentity) -> Provenance:
    """The :class:`Provenance` of objects made by the model with this identity."""
    return make_provenance(model_version=identity.version, model_sha256=identity.sha256)
