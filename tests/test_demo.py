"""`cxr-screen demo`, the README's main command, as a user runs it: a fresh process, no server."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_screens_and_points_at_its_report(tmp_path):
    environment = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(), "COLUMNS": "200"}
    environment.pop("PREFECT_API_URL", None)  # the embedded API, as on a laptop
    command = [sys.executable, "-m", "cli.main", "demo", "--workdir", str(tmp_path / "demo")]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Failed to send telemetry" not in output

    report = Path(re.search(r"Report: (\S+report\.html)", done.stdout).group(1))
    folder = report.parent
    html = report.read_text()
    assert "not a diagnosis" in html and "cut off in transfer" not in html
    summary = json.loads((folder / "summary.json").read_text())
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert summary["status"] == "completed" and summary["screened"] == len(rows) == 25
    (rejected,) = [row for row in rows if row["status"] == "rejected"]
    assert rejected["image_uri"].endswith("broken/scan-0001.png") and rejected["reason"] in html
    # The phantoms are learnable: the model must separate new opacities from clear lungs.
    truth = ["/covid/" in row["image_uri"] for row in rows if row["status"] == "ok"]
    flagged = [row["flagged"] == "True" for row in rows if row["status"] == "ok"]
    agreement = sum(t == f for t, f in zip(truth, flagged)) / len(truth)
    assert agreement >= 0.8, f"demo model agrees with the truth on only {agreement:.0%} of new phantoms"
    models = tmp_path / "demo" / "models"
    assert json.loads((models / "production.json").read_text())["version"] in done.stdout
