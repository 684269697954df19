"""A PACS as screening's source and as its results' destination: how fast, against a folder? (#26)

One run, one Orthanc (Debian's, with its DICOMweb plugin, configured by deployments/orthanc.py on
127.0.0.1) and one model, on the same --images chest phantoms (--size px square, 16-bit DX
radiographs, one study each, dated BENCH_DATE):

(a) screening: the files are written to a folder and the same bytes sent into Orthanc (its REST
    ``POST /instances``, as a modality's export would; timed too, as context). The screening flow
    then screens the folder and the PACS location (``dicomweb+http://...?StudyDate=BENCH_DATE``,
    QIDO-RS to list, WADO-RS to read), each into a fresh results folder, timed wall-clock around
    ``flows.screen.screen``: images per second for each and PACS / folder. Both use the flow's
    default engine (auto) and explain none, so the comparison is the storage, not Grad-CAM. An
    untimed warm-up run on each source first pays for what a first run pays once (Prefect's
    temporary server, TensorFlow's start and its traces, auto timing the engines, the DICOMweb
    client's import), so no timed run does; then --rounds rounds, alternating which source goes
    first, and the median. Both sources' files were just written, so both are read from the page cache.
    Beside the wall clock, the run summary's images_per_second (its own clock: listing and screening,
    not the flow's start or its report). The wall clock of a short run is coarse: Prefect 3.9.1's
    flow-run heartbeat thread sleeps in 1 s steps and the flow's end joins it, so each flow call
    ends on a whole-second step (a flow with nothing to screen takes 1.1 s).
    The PACS is also screened as the code did before it kept one HTTP session per thread (a new
    session, so a new connection, for every QIDO-RS and WADO-RS call): "PACS, a session per call".
(b) delivery: a TID 1500 SR per instance (screening/dicom_results.py), made before the clock starts,
    sent to Orthanc by STOW-RS one object per request, by STOW-RS 16 per request, and by C-STORE
    one association per object (store/dimse.store_instances, called per object as delivery calls it
    per image; and again without TCP_NODELAY, as before it was set), then, to tell the association's
    cost from the C-STORE's, all in one association:
    objects per second, median of --rounds, and ratios. Each way and round sends its own SRs (the
    model version in them names the way and round, so their derived UIDs differ and none is a resend
    Orthanc already holds); Orthanc's instance count checks that each stored all.

The model is trained here by the train flow on phantoms (weights none, --input-size px, 3 epochs)
unless --model-store names one. Orthanc, the flow, its decoders and the bench share this machine's
cores, as on a one-machine stack. --out writes the figures as JSON.

    .venv/bin/python bench/pacs_bench.py                       # 64 x 512 px, 3 rounds: about 2 min on 2 cores
    .venv/bin/python bench/pacs_bench.py --images 16 --size 256  # a quick look
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Prefect's database, auto's engine speeds: this run's own, in a temporary folder (set before Prefect loads).
_HOME = tempfile.mkdtemp(prefix="cxr-bench-pacs-")
atexit.register(shutil.rmtree, _HOME, True)  # registered first, so it runs after Prefect stops its server
os.environ.setdefault("PREFECT_HOME", str(Path(_HOME) / "prefect"))
os.environ.setdefault("CXR_ENGINE_SPEEDS", str(Path(_HOME) / "engine-speeds.json"))
# The flows warn of what is expected here (an unsigned store made for the run, phantoms drifting from
# the model's test split): errors only, so the table stands out.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the tests: two BLAS threads fight TensorFlow's on 2 cores
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import bootstrap

bootstrap(settings_file=False)  # first: TensorFlow's options; no site settings file, so runs compare
import numpy as np
import prefect
import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bench.machine import cpu_line
from deployments import orthanc
from flows.parameters import ScreenParameters, TrainParameters
from flows.screen import screen
from flows.train import train
from screening.dicom_results import Screening, structured_report
from store import dicomweb, dimse, registry
from store.phantoms import chest_phantom, write_phantom_dataset
from tests.dicom_builder import radiograph

BENCH_DATE = "20270315"  # every bench study's StudyDate: the PACS location asks for that day alone
BATCH = 16  # SRs per STOW-RS request in the batched way
CALLING_AET = "CXRSCREEN"  # the AE title configure() lets store; set for C-STORE whatever the shell says


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the instances -----------------------------------------------------------------------------

def radiographs(count: int, size: int) -> list[Dataset]:
    """Frontal chest DX radiographs of phantoms (16-bit), one study each, all dated BENCH_DATE."""
    rng = np.random.default_rng(26)
    return [radiograph(chest_phantom(rng, size).astype(np.uint16) * 257, bits_stored=16,
                       StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientID=f"P-{index:04d}",
                       PatientBirthDate="19610304", PatientSex="F", StudyDate=BENCH_DATE, StudyTime="021500",
                       StudyID="S1", AccessionNumber=f"B-{index:04d}", ReferringPhysicianName="SMITH^A",
                       SeriesNumber=1, InstanceNumber=1, PatientOrientation=["L", "F"], ViewPosition="PA",
                       BodyPartExamined="CHEST")
        for index in range(count)]


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- Orthanc -----------------------------------------------------------------------------------

def rest(pacs: orthanc.Orthanc, path: str, data: bytes | None = None) -> dict | list:
    """Orthanc's REST API as its administrator: JSON in, JSON out."""
    token = base64.b64encode(f"{pacs.user}:{pacs.password}".encode()).decode()
    request = urllib.request.Request(f"{pacs.url}{path}", data=data, method="POST" if data is not None else "GET",
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def instance_count(pacs: orthanc.Orthanc) -> int:
    return rest(pacs, "/statistics")["CountInstances"]


def stop(process: subprocess.Popen) -> None:
    """Orthanc stopped: SIGTERM to its group (it leads one), SIGKILL if it has not gone in 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- (a) screening -----------------------------------------------------------------------------

@contextlib.contextmanager
def session_per_call():
    """store/dicomweb.py as it was: a new requests session (a new connection) for every call."""
    import requests

    kept = dicomweb._session

    def fresh():
        session = requests.Session()
        session.auth = (os.environ["CXR_DICOMWEB_USER"], os.environ["CXR_DICOMWEB_PASSWORD"])
        return session

    dicomweb._session = fresh
    try:
        yield
    finally:
        dicomweb._session = kept


@contextlib.contextmanager
def nagle():
    """store/dimse.py as it was: Nagle's algorithm left on."""
    kept = dimse._no_delay
    dimse._no_delay = lambda association: None
    try:
        yield
    finally:
        dimse._no_delay = kept


def trained_store(store: str, work: Path, input_size: int) -> str:
    """A small model trained by the train flow on phantoms, production in ``store``: its version."""
    write_phantom_dataset(str(work / "dataset"), per_class=16, size=96, seed=11)
    trained = train(TrainParameters(dataset_uri=str(work / "dataset"), model_store_uri=store, input_size=input_size,
                                    weights="none", epochs=3, augment_draws=1, batch_size=8, bootstrap=100,
                                    force_promote=True))
    if not trained.promoted:  # unfit by the acceptance criteria: screened anyway, to be timed
        registry.set_production(store, trained.version, "benchmark: timed whatever its verdict")
    return trained.version


def timed_screen(incoming: str, results: str, store: str) -> dict:
    began = time.perf_counter()
    summary = screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=store,
                                      explain="none"))
    seconds = time.perf_counter() - began
    return {"screened": summary.screened, "ok": summary.ok, "status": summary.status, "engine": summary.engine,
            "seconds": seconds, "images_per_second": summary.screened / seconds,
            "summary_images_per_second": summary.images_per_second}


# --- (b) delivery ------------------------------------------------------------------------------

def timed_delivery(pacs: orthanc.Orthanc, send, objects: list[bytes], per_request: int) -> dict:
    """``objects`` sent ``per_request`` at a time by ``send(objects)``; checked against Orthanc's count."""
    before = instance_count(pacs)
    began = time.perf_counter()
    for start in range(0, len(objects), per_request):
        send(objects[start:start + per_request])
    seconds = time.perf_counter() - began
    return {"objects": len(objects), "calls": -(-len(objects) // per_request),
            "stored": instance_count(pacs) - before, "seconds": seconds, "objects_per_second": len(objects) / seconds}


# --- the run -----------------------------------------------------------------------------------

WAYS = {"stow_one": ("STOW-RS, one object per request", "stow", 1),
        f"stow_{BATCH}": (f"STOW-RS, {BATCH} objects per request", "stow", BATCH),
        "c_store_one": ("C-STORE, one association per object", "c_store", 1),
        "c_store_one_nagle": ("  the same without TCP_NODELAY (before)", "c_store_nagle", 1),
        # Not what delivery does (it sends an image's objects per call): says whether the association is the cost.
        "c_store_all": ("C-STORE, all in one association", "c_store", None)}


def measure(args: argparse.Namespace, work: Path) -> dict:
    store = args.model_store or str(work / "models")
    if not args.model_store:
        began = time.perf_counter()
        version = trained_store(store, work, args.input_size)
        print(f"model {version}: trained here ({args.input_size} px, weights none, 3 epochs) in "
              f"{time.perf_counter() - began:.0f} s", flush=True)
    datasets = radiographs(args.images, args.size)
    files = [part10(dataset) for dataset in datasets]
    (work / "incoming").mkdir()
    for index, data in enumerate(files):
        (work / "incoming" / f"{index:04d}.dcm").write_bytes(data)
    # Each way and round its own SRs (the model version names them: new UIDs, never a resend Orthanc
    # already holds), made before any clock starts: highdicom's cost is not the transport's.
    reports = {(way, round_): [part10(structured_report(dataset, Screening(
        "covid", 0.1 + 0.8 * index / len(datasets), 0.5, f"v-{way}-{round_}"))) for index, dataset in enumerate(datasets)]
        for way in WAYS for round_ in range(args.rounds)}

    pacs = orthanc.configure(work / "orthanc", free_port(), dicom_port=free_port(), calling_aets=(CALLING_AET,))
    process = orthanc.start(pacs, work / "orthanc.log")
    try:
        os.environ.update(CXR_DICOMWEB_USER=pacs.user, CXR_DICOMWEB_PASSWORD=pacs.password,
                          CXR_DICOM_CALLING_AET=CALLING_AET)
        versions = {"orthanc": rest(pacs, "/system")["Version"],
                    "dicomweb_plugin": rest(pacs, "/plugins/dicom-web")["Version"]}
        began = time.perf_counter()
        for data in files:
            rest(pacs, "/instances", data)
        upload = {"seconds": time.perf_counter() - began}
        upload["images_per_second"] = len(files) / upload["seconds"]
        if instance_count(pacs) != len(files):
            raise RuntimeError(f"Orthanc holds {instance_count(pacs)} instances, not the {len(files)} sent")

        pacs_location = f"{pacs.dicomweb}?StudyDate={BENCH_DATE}"
        sources = {"folder": str(work / "incoming"), "pacs": pacs_location, "pacs_session_per_call": pacs_location}
        ways = {"pacs_session_per_call": session_per_call}
        print("warm-up: each source screened once, untimed", flush=True)
        for name, source in sources.items():
            with ways.get(name, contextlib.nullcontext)():
                timed_screen(source, str(work / f"results-warm-up-{name}"), store)
        screening = {name: [] for name in sources}
        for round_ in range(args.rounds):
            # Alternating which goes first: whatever warms up within a round favours none.
            for name in sorted(sources, reverse=round_ % 2 == 1):
                with ways.get(name, contextlib.nullcontext)():
                    screening[name].append(timed_screen(sources[name], str(work / f"results-{name}-{round_}"), store))

        def c_store(batch: list[bytes]) -> None:
            dimse.store_instances(f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}", batch)

        def c_store_nagle(batch: list[bytes]) -> None:
            with nagle():
                c_store(batch)

        senders = {"stow": lambda batch: dicomweb.store_instances(pacs.dicomweb, batch), "c_store": c_store,
                   "c_store_nagle": c_store_nagle}
        delivery = {way: [timed_delivery(pacs, senders[sender], reports[way, round_], per_request or len(files))
                          for round_ in range(args.rounds)] for way, (_, sender, per_request) in WAYS.items()}
    finally:
        stop(process)
    return {"versions": versions, "file_bytes": int(np.mean([len(data) for data in files])),
            "report_bytes": int(np.mean([len(data) for data in reports[next(iter(reports))]])), "upload": upload,
            "screening": screening, "delivery": delivery}


def spread(runs: list[dict], key: str) -> tuple[float, str]:
    """The median of ``key`` over the rounds, and their range as text."""
    values = [run[key] for run in runs]
    return float(np.median(values)), f"{min(values):.1f}-{max(values):.1f}"


def show(figures: dict, images: int, size: int, rounds: int) -> dict[str, float]:
    upload, screening, delivery = figures["upload"], figures["screening"], figures["delivery"]
    print(f"\nsetup: {images} instances into Orthanc by REST POST /instances, one per request: "
          f"{upload['images_per_second']:.1f} images/s ({upload['seconds']:.1f} s)")

    print(f"\n(a) screening the same {images} instances ({size}x{size} 16-bit DX, {figures['file_bytes'] / 1024:.0f} KiB "
          f"each), engine auto, explain none; median of {rounds} rounds (range)")
    print(f"  {'source':<26}{'screened':>9}{'ok':>5}{'s':>7}{'images/s':>10}{'range':>13}{'summary img/s':>15}   engine")
    medians, summaries = {}, {}
    for name, label in (("folder", "folder"), ("pacs", "PACS (QIDO-RS + WADO-RS)"),
                        ("pacs_session_per_call", "  PACS, a session per call")):
        runs = screening[name]
        medians[name], shown = spread(runs, "images_per_second")
        summaries[name] = float(np.median([run["summary_images_per_second"] or float("nan") for run in runs]))
        print(f"  {label:<26}{runs[0]['screened']:9}{min(run['ok'] for run in runs):5}"
              f"{float(np.median([run['seconds'] for run in runs])):7.1f}{medians[name]:10.2f}{shown:>13}{summaries[name]:15.2f}"
              f"   {', '.join(sorted({run['engine'] for run in runs}))}")
        for run in runs:
            if run["status"] != "completed" or run["ok"] != images:
                print(f"  NOTE: a {name} run {run['status']} with {run['ok']} of {images} ok: the comparison is off")
    ratios = {"pacs_to_folder": medians["pacs"] / medians["folder"],
              "pacs_to_folder_summary": summaries["pacs"] / summaries["folder"],
              "sessions_kept_to_per_call": medians["pacs"] / medians["pacs_session_per_call"],
              "sessions_kept_to_per_call_summary": summaries["pacs"] / summaries["pacs_session_per_call"]}
    print(f"  {'PACS / folder':<26}{'':21}{ratios['pacs_to_folder']:9.2f}x{'':12}{ratios['pacs_to_folder_summary']:14.2f}x")
    print(f"  {'sessions kept / per call':<26}{'':21}{ratios['sessions_kept_to_per_call']:9.2f}x{'':12}"
          f"{ratios['sessions_kept_to_per_call_summary']:14.2f}x")
    print("  (s, images/s: wall clock around the flow call, its fixed costs included, in whole-second steps from\n"
          "   Prefect's heartbeat join; summary img/s: the run's own clock, listing and screening, no start or report)")

    print(f"\n(b) delivering {images} TID 1500 SRs ({figures['report_bytes'] / 1024:.1f} KiB each) to Orthanc; "
          f"median of {rounds} rounds (range)")
    print(f"  {'way':<37}{'calls':>9}{'stored':>8}{'s':>7}{'objects/s':>11}{'range':>13}{'vs STOW one':>13}")
    for way, (label, _, _) in WAYS.items():
        medians[way], shown = spread(delivery[way], "objects_per_second")
        ratios[f"{way}_to_stow_one"] = medians[way] / medians["stow_one"]
        runs = delivery[way]
        print(f"  {label:<37}{runs[0]['calls']:9}{min(run['stored'] for run in runs):8}"
              f"{float(np.median([run['seconds'] for run in runs])):7.2f}{medians[way]:11.1f}{shown:>13}"
              f"{ratios[f'{way}_to_stow_one']:12.2f}x")
        if any(run["stored"] != images for run in runs):
            print(f"  NOTE: Orthanc did not store all {images} in every round by {label}: "
                  f"{[run['stored'] for run in runs]}")
    ratios["c_store_one_to_stow_batched"] = medians["c_store_one"] / medians[f"stow_{BATCH}"]
    ratios["c_store_no_delay_to_nagle"] = medians["c_store_one"] / medians["c_store_one_nagle"]
    print(f"  C-STORE with TCP_NODELAY / without: {ratios['c_store_no_delay_to_nagle']:.2f}x")
    print(f"  C-STORE one per association / STOW-RS {BATCH} per request: {ratios['c_store_one_to_stow_batched']:.2f}x")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="instances screened and SRs delivered per way")
    parser.add_argument("--size", type=int, default=512, help="the radiographs' rows and columns")
    parser.add_argument("--input-size", type=int, default=64, help="the model trained here: its input size")
    parser.add_argument("--rounds", type=int, default=3, help="times each is measured (the median is shown)")
    parser.add_argument("--model-store", help="screen with this store's production model instead of training one")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.images < 1 or args.size < 64 or args.input_size < 32 or args.rounds < 1:
        parser.error(f"--images at least 1, --size at least 64, --input-size at least 32, --rounds at least 1; "
                     f"not {args.images}, {args.size}, {args.input_size}, {args.rounds}")
    print(cpu_line())
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-pacs-work-") as folder:
        figures = measure(args, Path(folder))
    versions = figures["versions"]
    print(f"Orthanc {versions['orthanc']}, DICOMweb plugin {versions['dicomweb_plugin']}; Prefect {prefect.__version__}; "
          f"pynetdicom {pynetdicom.__version__}; Python {sys.version.split()[0]}")
    ratios = show(figures, args.images, args.size, args.rounds)
    print(f"\nbench took {time.perf_counter() - began:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"machine": cpu_line(), "prefect": prefect.__version__,
                                        "pynetdicom": pynetdicom.__version__, "images": args.images, "size": args.size,
                                        "rounds": args.rounds,
                                        **figures, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
