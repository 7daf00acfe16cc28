"""Who made a result object: stable UIDs and the provenance written into every object.

The model's identity (checkpoint digests and operating point) is the cascade's
(:class:`cascade.inference.weights.ModelIdentity`); this module turns it into DICOM: the
Device UID, the Algorithm Name and Version, and the series UIDs that keep every version
of a result in one series: per study and kind, or per image and kind for the objects
OHIF reads one per series (SEG, TID 1500 SR).
"""

from __future__ import annotations

import hashlib

from cascade.inference.weights import ModelIdentity
from node import __version__
from node.reports.common import Provenance

__all__ = [
    "ALGORITHM_NAME",
    "PER_IMAGE_SERIES_KINDS",
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


#: Output kinds with one series per source image (each image's object alone in its series):
#: OHIF reads only the last instance of a SEG or SR series and shows the series of an
#: SR's first measurement only, so a series shared by the views would hide all but one.
PER_IMAGE_SERIES_KINDS: frozenset[str] = frozenset({"seg", "tid1500-sr"})


def series_uid_for(study_instance_uid: str, kind: str, image: str | None = None) -> str:
    """The Series Instance UID of one output kind, stable across versions and re-sends.

    Parameters
    ----------
    study_instance_uid : str
        The source study.
    kind : str
        Output kind (``"cad-sr"``, ``"tid1500-sr"``, ``"seg"``, ``"gsps"``).
    image : str or None
        SOP Instance UID of the source image. Required for the kinds in
        :data:`PER_IMAGE_SERIES_KINDS` (one series per (study, image, kind)); ignored
        for the others (one series per (study, kind)).

    Raises
    ------
    ValueError
        A per-image kind without ``image``.
    """
    if kind in PER_IMAGE_SERIES_KINDS:
        if not image:
            raise ValueError(f"series_uid_for: kind {kind!r} has one series per image: pass image")
        return derived_uid("calcnode-series", study_instance_uid, kind, image)
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
