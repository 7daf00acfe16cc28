"""Behaviour of ``calcnode demo`` (node.demo.run_demo): the real node end to end on
localhost, with the bundled weights, as ``make demo`` runs it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.demo import run_demo

pytestmark = pytest.mark.slow

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR Storage
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # the TID 1500 measurement report


def _received_sop_classes(out: Path) -> list[str]:
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
        for p in (out / "received").rglob("*")
        if p.is_file()
    )


def test_demo_can_be_run_twice_in_the_same_folder_and_reports_both_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(tmp_path, count=2, seed=0, timeout=300) == 0
    first = _received_sop_classes(tmp_path)
    assert CAD_SR in first and COMPREHENSIVE_SR in first

    # Same phantoms again: without clearing its old state the node would see duplicates of
    # a study it already reported, send nothing, and the demo would fail.
    assert run_demo(tmp_path, count=2, seed=0, timeout=300) == 0
    out = capsys.readouterr().out
    assert "cleared the previous demo run" in out
    assert _received_sop_classes(tmp_path) == first
    assert len(list((tmp_path / "previews").rglob("*.png"))) == 2
