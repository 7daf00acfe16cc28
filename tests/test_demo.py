"""Behaviour of ``calcnode demo`` (node.demo.run_demo): the real node end to end on
localhost, with the bundled weights, as ``make demo`` runs it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from node.demo import DEMO_MARKER, how_to_look, run_demo
from node.errors import CalcnodeError
from tests.helpers import ORTHANC, OrthancServer

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR Storage
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # the TID 1500 measurement report


def _received_sop_classes(out: Path) -> list[str]:
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
        for p in (out / "received").rglob("*")
        if p.is_file()
    )


@pytest.mark.slow
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
    assert (tmp_path / DEMO_MARKER).is_file()

    # It ends by saying how to look at the results, and its storescu command works.
    assert out.rstrip().endswith(how_to_look(tmp_path).rstrip())
    command = [line.strip() for line in out.splitlines() if line.strip().startswith("storescu")][-1]
    if ORTHANC.exists() and shutil.which("storescu"):
        orthanc = OrthancServer(tmp_path / "orthanc")
        orthanc.start()
        try:
            args = shlex.split(command.replace("localhost 4242", f"localhost {orthanc.dicom_port}"))
            assert "ORTHANC" == args[args.index("-aec") + 1] == orthanc.ae_title
            subprocess.run(args, check=True, capture_output=True, timeout=120)
            stored = len(orthanc.get("/instances"))
        finally:
            orthanc.stop()
        assert stored == 2 + len(first)  # the phantom images and every result


def test_demo_refuses_a_folder_it_did_not_make_and_leaves_it_untouched(tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()  # e.g. `calcnode demo --out .` in a source checkout
    (tmp_path / "node" / "cli.py").write_text("keep me")
    (tmp_path / "notes.txt").write_text("keep me too")
    with pytest.raises(CalcnodeError, match="not empty"):
        run_demo(tmp_path, count=1)
    assert (tmp_path / "node" / "cli.py").read_text() == "keep me"
    assert (tmp_path / "notes.txt").read_text() == "keep me too"
    assert not (tmp_path / DEMO_MARKER).exists()


def test_demo_takes_over_a_folder_an_older_demo_left_without_a_marker(tmp_path: Path) -> None:
    for name in ("node", "received"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match="count"):  # stops right after the folder check
        run_demo(tmp_path, count=0)


def test_demo_closing_words_say_where_the_results_are_and_how_to_look_at_them() -> None:
    text = " ".join(how_to_look(Path("demo-out")).split())
    assert "docs/viewing.md" in text
    assert "demo-out/phantoms/" in text and "demo-out/received/<study>/" in text
    # -R: only the SOP classes of the files (storescu's default list has no SEG).
    assert "storescu -aec ORTHANC -R +sd +r +sp '*.dcm' localhost 4242 demo-out/phantoms " in text
    for viewer in ("OHIF", "mammography workstation", "presentation states"):
        assert viewer in text
