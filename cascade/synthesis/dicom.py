"""A rendered phantom as a Digital Mammography X-Ray Image – For Presentation dataset."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from cascade import __version__
from cascade.synthesis.results import PhantomImage, PhantomStudy

#: Digital Mammography X-Ray Image Storage – For Presentation.
MG_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation
_VIEW_CODES = {
    "CC": ("399162004", "SCT", "cranio-caudal"),
    "MLO": ("399368009", "SCT", "medio-lateral oblique"),
}
#: Patient Orientation (row direction, column direction) as stored: chest wall on the
#: left for L and on the right for R, lateral / superior side up (Clunie's convention).
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def phantom_to_dataset(
    image: PhantomImage,
    *,
    study: PhantomStudy,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    series_number: int = 1,
) -> Dataset:
    """Build a Digital Mammography X-Ray Image – For Presentation dataset.

    The dataset passes ``dciodvfy`` without errors (a warning on ViewPosition CC / MLO is
    expected). When ``image.transfer_syntax`` is JPEG 2000 lossless the pixel data are
    compressed (pylibjpeg-openjpeg), otherwise stored explicit VR little endian.

    Parameters
    ----------
    image : PhantomImage
        The rendered image.
    study : PhantomStudy
        Patient and study attributes shared with the other images of the study.
    series_instance_uid, sop_instance_uid : str
        UIDs of the image's series and of the image.
    instance_number, series_number : int
        Positive integers.
    """
    if not isinstance(image, PhantomImage):
        raise TypeError(f"image must be a PhantomImage, got {type(image).__name__}")
    if not isinstance(study, PhantomStudy):
        raise TypeError(f"study must be a PhantomStudy, got {type(study).__name__}")
    for name, uid in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not uid or not pydicom.uid.UID(uid).is_valid:
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    if instance_number < 1 or series_number < 1:
        raise ValueError("instance_number and series_number must be positive")
    prof = image.vendor
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CALCNODE_" + __version__.replace(".", "")[:6]

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = study.study_time
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = study.study_time
    ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = prof.manufacturer
    ds.InstitutionName = "calcnode phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MG screening (synthetic phantom)"
    ds.SeriesDescription = f"{image.laterality} {image.view}"
    ds.ManufacturerModelName = prof.model
    ds.DeviceSerialNumber = "PHANTOM"
    ds.SoftwareVersions = f"calcnode phantom {__version__}"

    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = "F"
    ds.PatientAge = study.patient_age

    ds.BodyPartExamined = "BREAST"
    ds.BodyPartThickness = f"{image.params.get('thickness_mm', 50.0):.0f}"
    ds.CompressionForce = f"{float(image.params.get('compression_n', 100.0)):.0f}"
    ds.KVP = f"{26 + (float(image.params.get('thickness_mm', 50.0)) - 40) / 6:.0f}"
    ds.DistanceSourceToDetector = f"{prof.sid_mm:.0f}"
    ds.ExposureTime = "1200"
    ds.XRayTubeCurrent = "100"
    ds.Exposure = "120"
    ds.ImagerPixelSpacing = [f"{image.spacing_mm:.3f}", f"{image.spacing_mm:.3f}"]
    ds.AnodeTargetMaterial = prof.anode
    ds.FilterMaterial = prof.filter
    ds.ViewPosition = image.view
    ds.DetectorType = prof.detector_type
    ds.PositionerType = "MAMMOGRAPHIC"

    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = _PATIENT_ORIENTATION[(image.laterality, image.view)]
    ds.ImageLaterality = image.laterality
    ds.ImageComments = "Synthetic phantom rendered by calcnode; not a patient image."

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = image.rows, image.columns
    ds.PixelSpacing = [f"{image.spacing_mm:.3f}", f"{image.spacing_mm:.3f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.QualityControlImage = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if image.photometric == "MONOCHROME2" else 1
    ds.WindowCenter = f"{image.window_center:.1f}"
    ds.WindowWidth = f"{image.window_width:.1f}"
    ds.WindowCenterWidthExplanation = "BREAST"
    ds.VOILUTFunction = image.voi_function
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY" if image.photometric == "MONOCHROME2" else "INVERSE"

    ds.ViewCodeSequence = DicomSequence([_code(*_VIEW_CODES[image.view])])
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([])
    ds.AnatomicRegionSequence = DicomSequence([_code("76752008", "SCT", "Breast")])
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.PixelData = np.ascontiguousarray(image.pixels, dtype="<u2").tobytes()
    if image.transfer_syntax == JPEG2000Lossless:
        # pydicom would give the compressed instance a new random SOP Instance UID by
        # default: the manifest and determinism need the one we generated.
        ds.compress(
            JPEG2000Lossless,
            np.ascontiguousarray(image.pixels),
            encoding_plugin="pylibjpeg",
            generate_instance_uid=False,
        )
    return ds
