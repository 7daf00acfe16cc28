"""``make weights``, the documented command that reproduces the bundled weights, runs end
to end (with the tiny presets and a handful of phantoms, into a temporary folder)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cascade.inference.detector import Detector
from cascade.inference.weights import ModelWeights

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_weights_writes_a_weights_folder_the_detector_loads(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    cmd = [
        "make",
        "--no-print-directory",
        "weights",
        "PRESET=tiny",
        "TRAIN_COUNT=4",
        # the documented proposal network (cross-entropy), one epoch instead of six
        "PROPOSAL_ARGS=--loss ce --epochs 1",
        "VAL_COUNT=2",
        f"DATA={tmp_path / 'data'}",
        f"RUNS={tmp_path / 'runs'}",
        f"WEIGHTS_OUT={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"asn.pt", "fpr.pt", "weights.json"}
    record = json.loads((out / "weights.json").read_text())
    assert "not for clinical use" in record["intended_use"].lower()
    assert record["models"]["fpr"]["model_config"]["input_norm"] == "crop"
    # the last step calibrates the operating point on the validation phantoms
    op = ModelWeights.at(out / "asn.pt", out / "fpr.pt").stored_operating_point()
    assert op is not None
    assert op.calibration["images"] == 2
    assert op.calibration["manifest"].endswith("val/manifest.jsonl")
    image = sorted((tmp_path / "data" / "val").rglob("*.dcm"))[0]
    result = Detector(out / "asn.pt", out / "fpr.pt", device="cpu").detect(image)
    for det in result.detections:
        assert 0 <= det.x < result.columns and 0 <= det.y < result.rows
