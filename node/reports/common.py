"""What every DICOM result object shares: provenance, codes, coordinates, study attributes.

Coordinates
-----------
The cascade reports points in the project convention: ``x`` = column, ``y`` = row,
0-based, the **centre** of the first pixel at ``(0, 0)``, in the received image's
pixel grid. DICOM graphic coordinates (SR SCOORD, GSPS ``PIXEL`` units) put
``(0, 0)`` at the top-left **corner** of the first pixel, so a pixel centre is
``(col + 0.5, row + 0.5)``. :func:`to_graphic_xy` is the one place that converts.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from cascade.data.io import MG_SOP_CLASSES
from cascade.inference.detections import Detection, ImageDetections

__all__ = [
    "CONFORMED_KEYWORDS",
    "MG_SOP_CLASS_UIDS",
    "SERIES_DESCRIPTIONS",
    "SERIES_NUMBERS",
    "Provenance",
    "StudyImages",
    "add_provenance",
    "certainty_percent",
    "character_set_of",
    "circle_outline",
    "clip_to_image",
    "code_item",
    "conform_identifying_values",
    "conformed_header",
    "contributing_equipment_item",
    "copy_patient_and_study",
    "evidence_sequence",
    "laterality_of",
    "now_date_time",
    "resolve_instance",
    "to_graphic_xy",
    "validate_pair",
    "validate_study",
    "validate_uid",
]

logger = logging.getLogger(__name__)

#: Digital Mammography X-Ray Image Storage, For Presentation and For Processing.
MG_SOP_CLASS_UIDS: frozenset[str] = MG_SOP_CLASSES

#: SeriesDescription of each kind of result object (LO: at most 64 characters).
SERIES_DESCRIPTIONS: dict[str, str] = {
    "cad_sr": "calcnode CAD SR (not for clinical use)",
    "tid1500": "calcnode measurements SR (not for clinical use)",
    "seg": "calcnode SEG (not for clinical use)",
    "gsps": "calcnode annotations (not for clinical use)",
}

#: SeriesNumber of each kind (fixed, high enough not to clash with the modality's).
SERIES_NUMBERS: dict[str, int] = {"cad_sr": 9001, "tid1500": 9002, "seg": 9003, "gsps": 9004}

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

StudyImages = Sequence[tuple[Dataset, ImageDetections]]

_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
#: Type 2 in the Patient / General Study modules: present, possibly empty.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise naming ``name``.

    Parameters
    ----------
    value : object
        The candidate UID.
    name : str
        The argument's name, used in the error message.

    Raises
    ------
    TypeError
        ``value`` is not a string.
    ValueError
        ``value`` is not a valid UID (digits and dots, ≤ 64 characters, no leading zeros).
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str UID, got {type(value).__name__}")
    if len(value) > 64 or not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")
    return value


def _check_lo(
    value: object, name: str, *, allow_empty: bool = False, ascii_only: bool = True
) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if len(value) > 64:
        raise ValueError(f"{name} must be at most 64 characters (DICOM LO), got {len(value)}")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{name} must not contain backslashes or control characters")
    if ascii_only and not value.isascii():
        raise ValueError(f"{name} must be ASCII, got {value!r}")
    return value


@dataclass(frozen=True)
class Provenance:
    """The device that made a result object: algorithm, model and equipment identity.

    Parameters
    ----------
    algorithm_name : str
        Algorithm Name (TID 4019, ASCII), e.g. ``"calcnode uC cascade"``.
    algorithm_version : str
        Algorithm Version (the code's version).
    model_version : str
        Version of the trained model (checkpoint) that produced the detections.
    device_uid : str
        Device UID: a UID that changes with every trained model; the observer UID of
        the SRs and (0018,1002) of every object.
    manufacturer, model_name : str
        Manufacturer and ManufacturerModelName.
    software_versions : str
        SoftwareVersions; empty means ``"<algorithm_version> model <model_version>"``.
    device_serial_number : str
        DeviceSerialNumber (required by SEG and GSPS); empty means the device UID.
    institution_name : str or None
        InstitutionName of the node, optional.
    station_name : str or None
        StationName (SH, ≤ 16 characters), optional.
    """

    algorithm_name: str
    algorithm_version: str
    model_version: str
    device_uid: str
    manufacturer: str = "calcnode project"
    model_name: str = "calcnode"
    software_versions: str = ""
    device_serial_number: str = ""
    institution_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("algorithm_name", "algorithm_version", "model_version"):
            _check_lo(getattr(self, name), name)
        validate_uid(self.device_uid, "device_uid")
        _check_lo(self.manufacturer, "manufacturer")
        _check_lo(self.model_name, "model_name")
        if not self.software_versions:
            object.__setattr__(
                self, "software_versions", f"{self.algorithm_version} model {self.model_version}"
            )
        _check_lo(self.software_versions, "software_versions")
        if not self.device_serial_number:
            object.__setattr__(self, "device_serial_number", self.device_uid)
        _check_lo(self.device_serial_number, "device_serial_number")
        if self.institution_name is not None:
            _check_lo(self.institution_name, "institution_name")
        if self.station_name is not None:
            _check_lo(self.station_name, "station_name")
            if len(self.station_name) > 16:
                raise ValueError("station_name must be at most 16 characters (DICOM SH)")


def to_graphic_xy(x: float, y: float) -> tuple[float, float]:
    """Convert a project point to DICOM graphic coordinates.

    Parameters
    ----------
    x, y : float
        Project convention: x = column, y = row, 0-based, the first pixel's CENTRE at (0, 0).

    Returns
    -------
    (float, float)
        DICOM (column, row) with (0, 0) at the top-left CORNER of the first pixel, as
        used by SR SCOORD and GSPS PIXEL units: ``(x + 0.5, y + 0.5)``.
    """
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"x and y must be finite, got ({x!r}, {y!r})")
    return (float(x) + 0.5, float(y) + 0.5)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def laterality_of(source: Dataset) -> str:
    """ImageLaterality (else series Laterality) of an image: "L", "R", "B", "U" or ""."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(getattr(source, keyword, "") or "").strip().upper()
        if value in {"L", "R", "B", "U"}:
            return value
    return ""


def character_set_of(source: Dataset) -> str | list[str] | None:
    """The source's SpecificCharacterSet, to reuse in a result (None: the default repertoire).

    Copying it keeps the patient's names encodable; every string calcnode adds is ASCII.
    """
    if "SpecificCharacterSet" not in source:
        return None
    value = source.SpecificCharacterSet
    if isinstance(value, str):
        return value
    return [str(v) for v in value]


def now_date_time() -> tuple[str, str]:
    """The current local date and time as DICOM DA and TM strings."""
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def validate_pair(source: Dataset, detections: ImageDetections, *, name: str = "source") -> None:
    """Check that ``detections`` were computed on ``source`` (same SOP UID, same grid).

    Raises
    ------
    TypeError
        Wrong argument types.
    ValueError
        A SOP Instance UID, Rows/Columns or SOP Class mismatch, or missing attributes.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"{name} must be a pydicom Dataset, got {type(source).__name__}")
    if not isinstance(detections, ImageDetections):
        raise TypeError(f"detections for {name} must be ImageDetections")
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(getattr(source, keyword, "") or ""):
            raise ValueError(f"{name} lacks {keyword}")
    if str(source.SOPClassUID) not in MG_SOP_CLASS_UIDS:
        raise ValueError(
            f"{name} is not a Digital Mammography image (SOPClassUID {source.SOPClassUID})"
        )
    if detections.sop_instance_uid != str(source.SOPInstanceUID):
        raise ValueError(
            f"detections.sop_instance_uid {detections.sop_instance_uid} is not {name}'s "
            f"SOPInstanceUID {source.SOPInstanceUID}"
        )
    rows, cols = int(getattr(source, "Rows", 0)), int(getattr(source, "Columns", 0))
    if (detections.rows, detections.columns) != (rows, cols):
        raise ValueError(
            f"detections grid {detections.rows}x{detections.columns} differs from {name}'s "
            f"Rows x Columns {rows}x{cols}"
        )


def validate_study(study: object) -> list[tuple[Dataset, ImageDetections]]:
    """Validate a study: a non-empty sequence of (MG dataset, detections) of one patient/study.

    Returns
    -------
    list of (Dataset, ImageDetections)
        The pairs, in the given order.

    Raises
    ------
    TypeError, ValueError
        The message names ``study`` and the offending item.
    """
    if isinstance(study, (str, bytes)) or not isinstance(study, Sequence):
        raise TypeError("study must be a sequence of (Dataset, ImageDetections) pairs")
    pairs = list(study)
    if not pairs:
        raise ValueError("study must hold at least one (Dataset, ImageDetections) pair")
    seen: set[str] = set()
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"study[{i}] must be a (Dataset, ImageDetections) tuple")
        validate_pair(pair[0], pair[1], name=f"study[{i}]")
        uid = str(pair[0].SOPInstanceUID)
        if uid in seen:
            raise ValueError(f"study[{i}] repeats SOPInstanceUID {uid}")
        seen.add(uid)
    first = pairs[0][0]
    for i, (ds, _) in enumerate(pairs[1:], start=1):
        for keyword in ("StudyInstanceUID", "PatientID"):
            if str(getattr(ds, keyword, "")) != str(getattr(first, keyword, "")):
                raise ValueError(f"study[{i}] has another {keyword} than study[0]")
    return pairs


def resolve_instance(
    *,
    series_instance_uid: str,
    sop_instance_uid: str | None,
    version: int,
    instance_number: int | None = None,
) -> tuple[str, str, int]:
    """Validate the series/instance arguments; return (series UID, SOP UID, InstanceNumber).

    Every version of a result is a new instance: a new SOP Instance UID is generated
    when ``sop_instance_uid`` is None, and InstanceNumber defaults to ``version``.
    """
    validate_uid(series_instance_uid, "series_instance_uid")
    if sop_instance_uid is None:
        sop_instance_uid = generate_uid()
    validate_uid(sop_instance_uid, "sop_instance_uid")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int, got {type(version).__name__}")
    if version < 1:
        raise ValueError(f"version must be ≥ 1, got {version}")
    if instance_number is None:
        instance_number = version
    if isinstance(instance_number, bool) or not isinstance(instance_number, int):
        raise TypeError(f"instance_number must be an int, got {type(instance_number).__name__}")
    if instance_number < 1:
        raise ValueError(f"instance_number must be ≥ 1, got {instance_number}")
    return series_instance_uid, sop_instance_uid, instance_number


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and General Study attributes of ``source`` into ``target``.

    Type 2 attributes missing in the source are written empty, as the IODs require.
    """
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]
        elif keyword in _TYPE2_KEYWORDS:
            setattr(target, keyword, "")
    for keyword in ("IssuerOfPatientID", "PatientAge", "PatientWeight", "PatientSize"):
        if keyword in source:
            target[keyword] = source[keyword]


#: The string attributes copied from the source image into the results: those of the
#: Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
#: modules (highdicom copies them into the SEG, the GSPS and the TID 1500 SR;
#: :func:`copy_patient_and_study` the core of them into the CAD SR), and the retired
#: OtherPatientIDs. :func:`conform_identifying_values` makes them valid for their VR.
CONFORMED_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainAdditionalInformation",
    "OtherPatientNames",
    "OtherPatientIDs",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "StudyID",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalEventType",
)
#: Items of these sequences hold more of them (PatientID, IssuerOfPatientID, ...).
_CONFORMED_SEQUENCES = ("OtherPatientIDsSequence",)
#: VRs whose value is free text: too long → cut (PS3.5 Table 6.2-1, in characters).
_TEXT_MAX = {"LO": 64, "SH": 16, "LT": 10240, "ST": 1024, "UC": None, "UT": None}
#: VRs whose value has a format (a date, a code string, a number): invalid → left out.
_FORMATTED = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM"})
#: Control characters a free text may hold (besides ESC, which every string VR may
#: hold for ISO 2022 code extensions).
_TEXT_CONTROLS = {"LT": "\t\n\f\r", "ST": "\t\n\f\r", "UT": "\t\n\f\r"}
_PN_GROUP_MAX = 64
_SEXES = frozenset({"M", "F", "O"})


def _controls_removed(text: str, vr: str) -> str:
    allowed = _TEXT_CONTROLS.get(vr, "") + "\x1b"
    return "".join(" " if (ord(c) < 32 or c == "\x7f") and c not in allowed else c for c in text)


def _conform_one(keyword: str, vr: str, value: str) -> tuple[str | None, str | None]:
    """One string value made valid for its VR: (the value, or None to leave it out;
    what was wrong, or None). The message names the VR's rule, never the value."""
    problems: list[str] = []
    text = _controls_removed(value, vr)
    if text != value:
        problems.append("control characters replaced by spaces")
    if vr == "PN":
        groups = text.split("=")[:3]
        cut = ["^".join(g.split("^")[:5]) for g in groups]
        cut = [g[:_PN_GROUP_MAX] for g in cut]
        if cut != text.split("="):
            problems.append(
                f"longer than PN allows ({_PN_GROUP_MAX} characters a component group, "
                "5 components, 3 groups): cut"
            )
        text = "=".join(cut)
    elif vr in _TEXT_MAX:
        limit = _TEXT_MAX[vr]
        if limit is not None and len(text) > limit:
            problems.append(f"longer than {vr} allows ({limit} characters): cut")
            text = text[:limit]
    elif vr in _FORMATTED:
        try:
            validate_value(vr, text, pydicom_config.RAISE)
        except ValueError:
            return None, f"not a valid {vr} value: left out"
        if keyword == "PatientSex" and text.strip() and text.strip() not in _SEXES:
            return None, "not M, F or O: left out"
    return text, ("; ".join(problems) or None)


def _conform_element(ds: Dataset, keyword: str, *, type2: bool) -> str | None:
    """Make one element of ``ds`` valid (in place); what was wrong, or None."""
    if keyword not in ds:
        return None
    elem = ds[keyword]
    vr = str(elem.VR)
    if vr not in _TEXT_MAX and vr not in _FORMATTED and vr != "PN":
        return None
    raw: Any = elem.value
    if raw is None or raw == "":
        return None
    values = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
    problems: list[str] = []
    if dictionary_VM(elem.tag) == "1" and len(values) > 1:
        problems.append(f"{len(values)} values where 1 is allowed: the first kept")
        values = values[:1]
    kept: list[str] = []
    for value in values:
        fixed, problem = _conform_one(keyword, vr, str(value))
        if problem:
            problems.append(problem)
        if fixed is not None:
            kept.append(fixed)
    if not problems:
        return None
    if kept:
        ds[keyword] = DataElement(elem.tag, vr, kept[0] if len(kept) == 1 else kept)
    elif type2:
        ds[keyword] = DataElement(elem.tag, vr, "")
    else:
        del ds[keyword]
    return "; ".join(dict.fromkeys(problems))


def conform_identifying_values(ds: Dataset, *, context: str = "") -> list[str]:
    """Make the patient and study values of an image valid for their VR, in place.

    The results copy these values (:data:`CONFORMED_KEYWORDS`) from the image; a value
    that breaks its VR would make every result invalid (dciodvfy: ``Length invalid for
    this VR``) or fail its builder (highdicom refuses a PatientBirthDate of
    ``1941-02-03``). So, on the data set read for the results (the stored file is never
    changed):

    * free text (LO, SH, LT, ST) longer than its VR allows is cut to the limit; a person
      name (PN) to 64 characters a component group, 5 components, 3 groups;
    * control characters other than ESC (and, in LT/ST/UT, TAB, LF, FF, CR) become
      spaces;
    * a value with a format (DA, TM, DT, AS, CS, DS, IS, AE) that is not valid is left
      out — written empty where the results must have the attribute (Type 2:
      PatientBirthDate, PatientSex, StudyDate, ...), else not at all; a PatientSex
      other than M, F or O too. A date is never guessed from another spelling;
    * several values in an attribute that takes one: the first is kept.

    Each change is logged at WARNING naming the attribute and the rule, never the value.

    Parameters
    ----------
    ds : pydicom.Dataset
        The image as read (changed in place).
    context : str
        Prefix of the log lines (e.g. ``"job 12"``).

    Returns
    -------
    list of str
        ``"<keyword> (gggg,eeee): <what was wrong>"`` per attribute changed.
    """
    changed: list[str] = []
    targets: list[tuple[Dataset, str]] = [(ds, "")]
    for keyword in _CONFORMED_SEQUENCES:
        if keyword in ds:
            items = [item for item in ds[keyword].value if isinstance(item, Dataset)]
            targets.extend((item, f"{keyword} item {i + 1} ") for i, item in enumerate(items))
    for target, where in targets:
        for keyword in CONFORMED_KEYWORDS:
            problem = _conform_element(
                target, keyword, type2=not where and keyword in _TYPE2_KEYWORDS
            )
            if problem is None:
                continue
            tag = Tag(keyword)
            changed.append(f"{where}{keyword} ({tag.group:04X},{tag.element:04X}): {problem}")
    sop = str(ds.get("SOPInstanceUID", "") or "?")
    for change in changed:
        logger.warning(
            "%sSOP Instance %s: %s in the results",
            f"{context}: " if context else "",
            sop,
            change,
        )
    return changed


def conformed_header(source: Dataset, *, context: str = "") -> Dataset:
    """The header of ``source`` (no pixel data), its patient and study values made
    valid by :func:`conform_identifying_values`; ``source`` itself is not changed.

    For a builder that hands the source to highdicom, which copies those values and
    refuses invalid ones. The elements are shared with ``source`` (not copied); only
    the ones conformed are replaced.
    """
    header = Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:  # Pixel Data and its float siblings
            header.add(elem)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    conform_identifying_values(header, context=context)
    return header


def contributing_equipment_item(provenance: Provenance) -> Dataset:
    """One ContributingEquipmentSequence item: this node as Processing Equipment (109102)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item("109102", "DCM", "Processing Equipment")]
    )
    item.Manufacturer = provenance.manufacturer
    item.ManufacturerModelName = provenance.model_name
    item.SoftwareVersions = provenance.software_versions
    item.DeviceSerialNumber = provenance.device_serial_number
    item.DeviceUID = provenance.device_uid
    if provenance.institution_name:
        item.InstitutionName = provenance.institution_name
    if provenance.station_name:
        item.StationName = provenance.station_name
    item.ContributionDateTime = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = (
        f"{provenance.algorithm_name} {provenance.algorithm_version}, "
        f"model {provenance.model_version}"
    )[:64]
    return item


def add_provenance(ds: Dataset, provenance: Provenance) -> None:
    """Write General Equipment attributes and ContributingEquipmentSequence into ``ds``."""
    ds.Manufacturer = provenance.manufacturer
    ds.ManufacturerModelName = provenance.model_name
    ds.SoftwareVersions = provenance.software_versions
    ds.DeviceSerialNumber = provenance.device_serial_number
    ds.DeviceUID = provenance.device_uid
    if provenance.institution_name:
        ds.InstitutionName = provenance.institution_name
    if provenance.station_name:
        ds.StationName = provenance.station_name
    ds.ContributingEquipmentSequence = DicomSequence([contributing_equipment_item(provenance)])


def evidence_sequence(sources: Sequence[Dataset]) -> DicomSequence:
    """CurrentRequestedProcedureEvidenceSequence items listing every source, by study/series."""
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    for ds in sources:
        series = by_study.setdefault(str(ds.StudyInstanceUID), {})
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    items = []
    for study_uid, series_map in by_study.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        series_items = []
        for series_uid, members in series_map.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            refs = []
            for ds in members:
                ref = Dataset()
                ref.ReferencedSOPClassUID = ds.SOPClassUID
                ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
                refs.append(ref)
            series_item.ReferencedSOPSequence = DicomSequence(refs)
            series_items.append(series_item)
        study_item.ReferencedSeriesSequence = DicomSequence(series_items)
        items.append(study_item)
    return DicomSequence(items)


def certainty_percent(detection: Detection) -> float:
    """Certainty of Finding in percent: the FPR probability × 100, in [0, 100]."""
    return float(min(max(detection.fpr_score * 100.0, 0.0), 100.0))


def circle_outline(
    points: Sequence[tuple[float, float]],
    radii: Sequence[float],
    *,
    n: int = 16,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Closed convex hull around discs, in DICOM graphic coordinates.

    Parameters
    ----------
    points : sequence of (x, y)
        Disc centres in DICOM graphic coordinates (corner origin).
    radii : sequence of float
        Disc radii in pixels (at least 1 pixel is used).
    n : int
        Vertices sampled per disc.
    bounds : (columns, rows) or None
        When given, vertices are clipped to ``[0, columns] × [0, rows]``: graphic
        coordinates outside the image are invalid (a cluster at the image edge).

    Returns
    -------
    numpy.ndarray
        ``(k + 1, 2)`` float array of (column, row) vertices; the last equals the first.
    """
    from scipy.spatial import ConvexHull

    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    cloud = np.concatenate(
        [
            np.stack([x + max(r, 1.0) * np.cos(angles), y + max(r, 1.0) * np.sin(angles)], axis=1)
            for (x, y), r in zip(points, radii, strict=True)
        ]
    )
    if bounds is not None:
        cloud[:, 0] = np.clip(cloud[:, 0], 0.0, float(bounds[0]))
        cloud[:, 1] = np.clip(cloud[:, 1], 0.0, float(bounds[1]))
    hull = ConvexHull(cloud)
    vertices = cloud[hull.vertices]
    return np.concatenate([vertices, vertices[:1]], axis=0)


def clip_to_image(x: float, y: float, *, columns: int, rows: int) -> tuple[float, float]:
    """Clip a DICOM graphic point to the image area ``[0, columns] × [0, rows]``."""
    return float(min(max(x, 0.0), columns)), float(min(max(y, 0.0), rows))
