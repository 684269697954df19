"""The whole product in a few minutes, with no data, server or internet: synthetic chest phantoms,
a model trained on them from scratch, and a screening run over new phantoms and one broken file."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from flows.parameters import ScreenParameters, TrainParameters
from flows.screen import screen
from flows.train import train
from screening.results import RunSummary
from store import storage
from store.phantoms import write_phantom_dataset
from tasks.bundling import TrainedModel


@dataclass(frozen=True)
class DemoResult:
    trained: TrainedModel
    screened: RunSummary


@flow(name="demo", description="Train on synthetic phantoms and screen new ones, end to end.")
def demo(workdir: str = "demo-run", per_class: int = 40, incoming_per_class: int = 12, input_size: int = 64,
         epochs: int = 20) -> DemoResult:
    """Returns the training result and the screening summary; everything is written under ``workdir``."""
    logger = get_run_logger()
    dataset, incoming = storage.join(workdir, "dataset"), storage.join(workdir, "incoming")
    models, results = storage.join(workdir, "models"), storage.join(workdir, "results")
    if not storage.exists(storage.join(dataset, "covid", "covid-0-0000.png")):
        write_phantom_dataset(dataset, per_class=per_class, size=256, seed=0)
        logger.info("Wrote %d labelled phantoms to %s", 2 * per_class, dataset)
    trained = train(TrainParameters(dataset_uri=dataset, model_store_uri=models, weights="none",
                                    input_size=input_size, epochs=epochs, augment_draws=2))

    # Each demo run brings a new night's worth of X-rays, so reruns have something to screen.
    try:
        night = len({storage.relative_to(uri, incoming).split("/")[0] for uri in storage.list_files(incoming)})
    except storage.NotFound:
        night = 0
    tonight = storage.join(incoming, f"night-{night + 1:03d}")
    write_phantom_dataset(tonight, per_class=incoming_per_class, size=256, seed=100 + night)
    storage.write_bytes(storage.join(tonight, "broken", "scan-0001.png"), b"\x89PNG\r\n\x1a\n cut off in transfer")
    summary = screen(ScreenParameters(incoming_uri=incoming, results_uri=results, model_store_uri=models))
    logger.info("Report: %s", summary.outputs["report.html"])
    return DemoResult(trained, summary)
