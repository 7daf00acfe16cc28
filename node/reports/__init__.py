"""The DICOM result objects calcnode creates, one module per object.

- :func:`build_cad_sr` — Mammography CAD SR (TID 4000), one per study (mammography workstations).
- :func:`build_tid1500_sr` — TID 1500 Measurement Report, Comprehensive SR, one per study (OHIF).
- :func:`build_seg` — binary Segmentation, one per image with findings.
- :func:`build_gsps` — Grayscale Softcopy Presentation State, one per image (generic viewers).

All take the received MG datasets and :class:`cascade.inference.detector.ImageDetections`
(x = column, y = row, 0-based, first pixel's CENTRE at (0, 0), received grid) and
write DICOM graphic coordinates ((0, 0) at the first pixel's top-left CORNER).
See ``docs/conformance.md``.
"""

from node.reports.cad_sr import build_cad_sr, cluster_detections
from node.reports.common import SERIES_DESCRIPTIONS, Provenance, to_graphic_xy
from node.reports.gsps import build_gsps
from node.reports.seg import build_seg
from node.reports.tid1500 import build_tid1500_sr

__all__ = [
    "SERIES_DESCRIPTIONS",
    "Provenance",
    "build_cad_sr",
    "build_gsps",
    "build_seg",
    "build_tid1500_sr",
    "cluster_detections",
    "to_graphic_xy",
]
