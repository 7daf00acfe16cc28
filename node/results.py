"""What a job produced, and where it goes: the typed hand-off between worker and scheduler.

The worker stores a :class:`JobResult` (as JSON) in the job's row when it completes the
job; the scheduler reads it back at study completion to build the study's SRs and to
queue the per-image objects' sends again. :func:`queue_sends` is the one place that
turns produced objects into sends (one per destination that takes the object's kind).
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from cascade.inference.detections import ImageDetections
from node.reports.common import Provenance
from node.settings import Settings
from storage.database import Database

__all__ = ["JobResult", "ResultObject", "encode_dataset", "queue_sends"]


@dataclass(frozen=True, kw_only=True)
class ResultObject:
    """One DICOM object calcnode made and stored, to be sent.

    Attributes
    ----------
    kind : str
        Output kind: ``"seg"``, ``"gsps"``, ``"cad-sr"`` or ``"tid1500-sr"``.
    path : str
        Its path relative to the file store's root.
    sop_class_uid, sop_instance_uid : str
        Its SOP Class and Instance UIDs.
    """

    kind: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("kind", "path", "sop_class_uid", "sop_instance_uid"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ResultObject.{name} must be a non-empty str, got {value!r}")

    @classmethod
    def of(cls, ds: Dataset, *, kind: str, path: str) -> ResultObject:
        """The object for a dataset written to ``path``."""
        return cls(
            kind=kind,
            path=path,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "path": self.path,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultObject:
        """Inverse of :meth:`to_json`; ``ValueError`` naming a missing field."""
        try:
            return cls(
                kind=str(data["kind"]),
                path=str(data["path"]),
                sop_class_uid=str(data["sop_class_uid"]),
                sop_instance_uid=str(data["sop_instance_uid"]),
            )
        except KeyError as exc:
            raise ValueError(f"result object JSON lacks {exc.args[0]!r}") from None


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """What one job (one received image) produced.

    Attributes
    ----------
    detections : ImageDetections
        The image's findings, received grid (x = column, y = row, pixel centres).
    seconds : float
        Time the detector took.
    provenance : Provenance
        The model and algorithm that made them.
    worker : str
        The worker that ran the job.
    objects : tuple of ResultObject
        The per-image objects made (SEG, GSPS), to be sent.
    build_errors : mapping
        Output kind → error of a per-image object that could not be built.
    paths : tuple of str
        Every file the job wrote (store-relative): removed again when the job's result
        is discarded.
    """

    detections: ImageDetections
    seconds: float
    provenance: Provenance
    worker: str
    objects: tuple[ResultObject, ...] = ()
    build_errors: Mapping[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.detections, ImageDetections):
            raise TypeError("JobResult.detections must be an ImageDetections")
        if not isinstance(self.provenance, Provenance):
            raise TypeError("JobResult.provenance must be a Provenance")
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "build_errors", dict(self.build_errors))

    @property
    def detection_count(self) -> int:
        return len(self.detections.detections)

    def to_json(self) -> dict[str, Any]:
        """The job row's ``result`` (plain JSON types)."""
        prov = self.provenance
        return {
            "detections": self.detections.to_json(),
            "detection_count": self.detection_count,
            "seconds": round(float(self.seconds), 3),
            "provenance": {
                "algorithm_name": prov.algorithm_name,
                "algorithm_version": prov.algorithm_version,
                "model_version": prov.model_version,
                "device_uid": prov.device_uid,
            },
            "worker": self.worker,
            "objects": [o.to_json() for o in self.objects],
            "build_errors": dict(self.build_errors),
            "paths": list(self.paths),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobResult:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            A missing or invalid field; the message names it.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a job result must be a JSON object, got {type(data).__name__}")
        try:
            prov = data["provenance"]
            return cls(
                detections=ImageDetections.from_json(data["detections"]),
                seconds=float(data.get("seconds", 0.0)),
                provenance=Provenance(
                    algorithm_name=str(prov["algorithm_name"]),
                    algorithm_version=str(prov["algorithm_version"]),
                    model_version=str(prov["model_version"]),
                    device_uid=str(prov["device_uid"]),
                ),
                worker=str(data.get("worker", "")),
                objects=tuple(ResultObject.from_json(o) for o in data.get("objects", [])),
                build_errors={str(k): str(v) for k, v in data.get("build_errors", {}).items()},
                paths=tuple(str(p) for p in data.get("paths", [])),
            )
        except KeyError as exc:
            raise ValueError(f"job result JSON lacks {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"job result JSON is malformed: {exc}") from None


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (file meta required)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def queue_sends(
    database: Database,
    settings: Settings,
    study_instance_uid: str,
    objects: Iterable[ResultObject],
    *,
    now: dt.datetime | None = None,
) -> int:
    """Queue every object for each destination that takes its kind; returns how many.

    Idempotent per destination and SOP Instance UID (the queue's rule), so queueing
    the same objects again — as the scheduler does at study completion, for a worker
    that died between completing its job and queueing its sends — sends nothing twice.
    """
    count = 0
    objects = list(objects)
    for dest in settings.destinations:
        kinds = settings.destination_kinds(dest)
        for obj in objects:
            if obj.kind not in kinds:
                continue
            database.sends.add_send(
                destination=dest.name,
                object_path=obj.path,
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
                study_instance_uid=study_instance_uid,
                kind=obj.kind,
                now=now,
            )
            count += 1
    return count
