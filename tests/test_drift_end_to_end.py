"""Scope and drift end to end, on real chest X-rays: a model trained on ../shared/data/cxr without
a fifth of its patients; a night of those held-out patients' X-rays passes, a night of the
out-of-scope set is refused for the right reasons, ordinary nights drawn from the held-out X-rays
rarely alarm, and a mixed night alarms through a real Prefect server: the event reaches a local
webhook through the automation ``cxr-screen deploy`` creates, and the nightly deployment is paused."""

from __future__ import annotations

import collections
import csv
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from model.drift_tests import compare
from model.scope import REASONS
from screening.drift import night_profile
from screening.results import PredictionRow
from store import registry, storage
from store.out_of_scope import write_out_of_scope_set
from tests.conftest import require_shared_data
from tests.test_screen_flow import run_rows, run_screen
from tests.test_stack import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 0.2  # of each (class, source) stratum's patients
PER_KIND = 20  # out-of-scope images of each kind


@pytest.fixture(scope="module")
def real(prefect_api, tmp_path_factory) -> dict:
    """The held-out patients' X-rays in ``night`` (with their manifest rows), the rest as a labelled
    dataset, and a model trained on it (64 px, weights none)."""
    from flows.parameters import TrainParameters
    from flows.train import train

    data = require_shared_data()
    root = tmp_path_factory.mktemp("drift-real")
    with open(data / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    strata = collections.defaultdict(set)
    for row in rows:
        strata[(row["class"], row["source_dataset"])].add(row["patient_id"])
    rng, held = np.random.default_rng(7), set()
    for patients in strata.values():
        chosen = sorted(patients)
        held |= set(rng.choice(chosen, round(HELD_OUT * len(chosen)), replace=False))
    training = [row for row in rows if row["patient_id"] not in held]
    night = [row for row in rows if row["patient_id"] in held]
    for row in training:
        (root / "dataset" / row["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / row["file"], root / "dataset" / row["file"])
    with open(root / "dataset" / "manifest.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(training)
    (root / "night").mkdir()
    for row in night:
        shutil.copyfile(data / row["file"], root / "night" / row["file"].replace("/", "__"))
    trained = train(TrainParameters(dataset_uri=str(root / "dataset"), model_store_uri=str(root / "models"),
                                    input_size=64, weights="none", epochs=3, augment_draws=1, batch_size=16,
                                    force_promote=True))
    return {"root": root, "store": str(root / "models"), "version": trained.version, "night": root / "night",
            "night_rows": night}


@pytest.fixture(scope="module")
def held_out_night(real) -> dict:
    results = str(real["root"] / "results-held-out")
    summary = run_screen(str(real["night"]), results, real["store"], model_version=real["version"])
    records = [json.loads(line) for line in storage.read_bytes(summary.outputs["predictions.jsonl"]).splitlines()]
    return {"summary": summary, "rows": run_rows(results), "records": records}


def test_training_keeps_the_test_split_as_the_drift_reference(real):
    card = registry.load_card(real["store"], real["version"])
    reference = registry.load_drift_reference(real["store"], card)
    assert reference is not None
    assert len(reference.values["probability"]) > 50 and len(reference.values["image brightness"]) > 50
    assert sum(reference.categories["rejected share"].values()) == card.dataset["test_images"]
    assert card.scope["threshold"] is not None  # enough real images for the feature score


def test_a_night_of_held_out_x_rays_passes_without_an_alarm(held_out_night, real):
    summary, rows = held_out_night["summary"], held_out_night["rows"]
    assert summary.screened == len(real["night_rows"]) > 100
    rejected = [row["reason"] for row in rows if row["status"] == "rejected"]
    assert len(rejected) <= 0.02 * summary.screened, rejected
    assert summary.drift["alarm"] is False and summary.drift["reference"]["kind"] == "test split"
    names = {test["name"] for test in summary.drift["tests"]}
    assert {"probability", "scope score", "image brightness", "image contrast", "rejected share"} <= names


def test_ordinary_nights_rarely_alarm(held_out_night, real):
    """200 nights of 40 X-rays drawn from the held-out patients' rows, against the test split."""
    card = registry.load_card(real["store"], real["version"])
    reference = registry.load_drift_reference(real["store"], card)
    rows = [PredictionRow.from_record(record, card.classes) for record in held_out_night["records"]]
    rng = np.random.default_rng(3)
    alarms = sum(compare(night_profile([rows[i] for i in rng.choice(len(rows), 40, replace=False)],
                                       card.positive_class), reference).alarm for _ in range(200))
    assert alarms / 200 <= 0.05, alarms


def test_a_night_out_of_scope_is_refused_for_the_right_reasons(real):
    folder = real["root"] / "out-of-scope"
    greys = [_grey(path) for path in sorted(real["night"].iterdir())[:PER_KIND * 3]]
    write_out_of_scope_set(str(folder), PER_KIND, greys, size=128, seed=5)
    results = str(real["root"] / "results-out-of-scope")
    summary = run_screen(str(folder), results, real["store"], model_version=real["version"])
    rows = run_rows(results)
    assert summary.screened == 7 * PER_KIND
    assert summary.rejected >= 0.9 * summary.screened, collections.Counter(row["reason"] for row in rows)
    reasons = collections.defaultdict(collections.Counter)
    for row in rows:
        reasons[storage.relative_to(row["image_uri"], str(folder)).split("/")[0]][row["reason"]] += 1
    print({kind: dict(counted) for kind, counted in reasons.items()})  # for the closing note (pytest -s)
    # The pixels decide these; a turned X-ray refused as "not a chest radiograph" is refused all the same.
    expected = {"photograph": (REASONS["colour"], 0.8), "inverted": (REASONS["inverted"], 0.7),
                "rotated": (REASONS["rotated"], 0.7)}
    for kind, (reason, share) in expected.items():
        assert reasons[kind][reason] >= share * PER_KIND, (kind, reasons[kind])
    for kind in ("photograph", "document", "other-modality", "blank-or-noise", "inverted", "rotated"):
        assert sum(count for reason, count in reasons[kind].items() if reason) >= 0.9 * PER_KIND, (kind, reasons[kind])
    assert summary.drift["alarm"] is True and "rejected share" in [t["name"] for t in summary.drift["tests"]
                                                                  if t["alarm"]]


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _wait(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url}")


def test_a_mixed_night_alarms_and_the_automation_notifies_and_pauses(real, tmp_path):
    """Through a real Prefect server: `cxr-screen deploy` with a Custom Webhook block and
    CXR_PAUSE_ON_DRIFT=true, then `cxr-screen screen` on half held-out X-rays, half out of scope."""
    mixed = tmp_path / "mixed"
    night = sorted(real["night"].iterdir())[:40]
    for path in night:
        (mixed / "x-rays").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, mixed / "x-rays" / path.name)
    write_out_of_scope_set(str(mixed / "other"), 6, [_grey(path) for path in night[:18]], size=128, seed=9)

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    (tmp_path / "empty.env").write_text("")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    environment.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, CXR_SETTINGS=str(tmp_path / "empty.env"),
                       PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(f"{api}/health", server)
        block = ("from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
                 f"B(name='cxr-drift', url='http://127.0.0.1:{receiver.server_address[1]}/hook', "
                 "json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('cxr-drift')")
        _run([sys.executable, "-c", block], environment)
        deploy_environment = {**environment, "CXR_DRIFT_NOTIFY_BLOCK": "custom-webhook/cxr-drift",
                              "CXR_PAUSE_ON_DRIFT": "true"}
        missing = subprocess.run([sys.executable, "-m", "cli.main", "deploy"], cwd=ROOT, capture_output=True,
                                 text=True, env={**deploy_environment, "CXR_DRIFT_NOTIFY_BLOCK": "custom-webhook/nobody"})
        assert missing.returncode == 3, missing.stdout + missing.stderr
        assert "CXR_DRIFT_NOTIFY_BLOCK 'custom-webhook/nobody': cannot be loaded" in missing.stdout + missing.stderr
        assert "deployed" not in missing.stdout  # refused before anything is deployed
        for _ in range(2):  # deploying again replaces the automation
            deployed = _run([sys.executable, "-m", "cli.deploy"], deploy_environment).stdout
            assert "deployed cxr-screening-drift" in deployed, deployed
        count = _run([sys.executable, "-c", _COUNT_AUTOMATIONS], environment).stdout.strip().splitlines()[-1]
        assert count == "1"

        screened = _run([sys.executable, "-m", "cli.main", "screen", str(mixed), "--results", str(tmp_path / "results"),
                         "--model-store", real["store"], "--model-version", real["version"]], environment).stdout
        assert "Drift alarm" in screened and "rejected share" in screened, screened
        summary = json.loads(storage.read_bytes(next(
            uri for uri in storage.list_files(str(tmp_path / "results" / "runs")) if uri.endswith("summary.json"))))
        run_id = summary["run_id"]
        assert summary["drift"]["alarm"] is True
        report = storage.read_bytes(summary["outputs"]["report.html"]).decode()
        assert "<strong>Drift alarm</strong>" in report and f"cxr-screen drift accept {run_id}" in report

        deadline = time.monotonic() + 90
        while not _Receiver.received and time.monotonic() < deadline:
            time.sleep(1)
        assert _Receiver.received, "the drift notification never reached the webhook"
        message = _Receiver.received[0]
        assert run_id in message["subject"] and "rejected share" in message["body"] and "paused" in message["body"]
        paused = None
        while time.monotonic() < deadline:
            paused = _run([sys.executable, "-c", _READ_PAUSED], environment).stdout.strip().splitlines()[-1]
            if paused == "True":
                break
            time.sleep(1)
        assert paused == "True", "the nightly deployment was not paused"
        assert "cxr-screen drift resume" in message["body"]
        resumed = _run([sys.executable, "-m", "cli.main", "drift", "resume"], environment).stdout
        assert "Resumed screen/nightly-screening" in resumed
        assert _run([sys.executable, "-c", _READ_PAUSED], environment).stdout.strip().splitlines()[-1] == "False"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        receiver.shutdown()


_COUNT_AUTOMATIONS = """from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(len(client.read_automations_by_name('cxr-screening-drift')))"""
_READ_PAUSED = """from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(client.read_deployment_by_name('screen/nightly-screening').paused)"""


def _run(command: list[str], environment: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{command[-1][:80]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _grey(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
