"""Where the deployments read and write, and how they run: one settings object.

Values come from environment variables ``CXR_<NAME>`` or from the file named by ``CXR_SETTINGS``
(default ``cxr.env`` in the working folder; see ``deployments/cxr.env.example``). The settings that
say where code comes from or runs (``project_dir``, ``dask_address``) come from the environment
only: a file that sets them is refused (``deployments/environment_only.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from deployments.environment_only import refusal
from flows.parameters import ScreenParameters, SynthesizeParameters, TrainParameters

PROJECT_DIR = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=os.environ.get("CXR_SETTINGS", "cxr.env"),
                                      extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, in the usual order, once the settings file is known to set none of the
        environment-only settings (ValueError naming the file otherwise)."""
        refused = refusal(str(getattr(dotenv_settings, "env_file", None)), getattr(dotenv_settings, "env_vars", {}))
        if refused:
            raise ValueError(refused)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    incoming: str = Field("s3://cxr/incoming", description="Where new X-rays arrive (folder or s3://).")
    results: str = Field("s3://cxr/results", description="Where screening writes run folders and its ledger.")
    model_store: str = Field("s3://cxr/models", description="Model store shared by training and screening.")
    dataset: str = Field("s3://cxr/datasets/current", description="Labelled dataset the retrain deployment uses.")
    weights: str = Field("imagenet", description="Base weights for retraining: imagenet, none, or a file URI.")
    timezone: str = Field("UTC", description="Time zone of the nightly schedule (IANA name, e.g. Europe/Berlin).")
    nightly_cron: str = Field("0 2 * * *", description="When nightly screening runs, in that time zone.")
    # Unset: the train flow's own default (flows/parameters.py), so each default is written once.
    train_epochs: int | None = Field(None, description="Stage-1 epochs of the retrain deployment.")
    train_fine_tune_epochs: int | None = Field(None, description="Stage-2 (block5) epochs of the retrain deployment.")
    train_input_size: int | None = Field(None, description="Input size of retrained models.")
    train_min_auc: float | None = Field(None, description="Acceptance: lowest test AUC (see acceptance_bound).")
    train_min_specificity: float | None = Field(
        None, description="Acceptance: lowest test specificity at the threshold (see acceptance_bound).")
    train_acceptance_bound: str | None = Field(None, description="'lower' (95 % bound) or 'point' (estimate).")
    train_dataset_prefixes: str | None = Field(
        None, description="Comma-separated folders or s3:// prefixes retraining may read datasets from; an event "
                          "naming a dataset elsewhere is refused. Unset: anywhere.")
    train_scope_pass_rate: float | None = Field(
        None, description="Share of real frontal X-rays the scope gate lets through (chosen on training images).")
    train_scope_negatives: str | None = Field(
        None, description="Out-of-scope set (a folder or s3:// prefix, one subfolder per kind) the scope gate is "
                          "measured on; unset: one training builds.")
    train_require_approval: bool | None = Field(
        None, description="Leave retrained models as candidates until 'cxr-screen models promote'.")
    screen_batch_size: int | None = Field(None, description="Images per forward pass in nightly screening.")
    screen_chunk_size: int | None = Field(None, description="Images per Prefect task in nightly screening.")
    screen_engine: str | None = Field(None, description="auto, fp32, bf16 or int8 (see model/inference.py).")
    screen_explain: str | None = Field(None, description="flagged, all or none: which images get Grad-CAM.")
    screen_max_file_bytes: int | None = Field(None, description="Inputs larger than this get a rejected row.")
    screen_decode_timeout_seconds: float | None = Field(None, description="Per-input read and decode time limit.")
    screen_abandoned_after_minutes: float | None = Field(
        None, description="Silence after which a screening run's lease is taken for dead.")
    screen_chunk_timeout_minutes: float | None = Field(None, description="A chunk running longer is stopped and retried.")
    screen_workers: int | None = Field(None, description="Screen on a local Dask cluster of this many processes.")
    screen_drift_window: int | None = Field(None, description="Accepted nights that make the drift reference.")
    screen_since: str | None = Field(None, description="With a PACS location: the night's window, e.g. 1d.")
    screen_deliver_to: str | None = Field(None, description="Where results go back as DICOM (STOW-RS or C-STORE).")
    uid_root: str | None = Field(None, description="The UID root of the DICOM objects delivered.")
    delivery_max_nights: int | None = Field(None, description="Runs a delivery may fail on before it is dead.")
    drift_notify_block: str | None = Field(
        None, description="Notification block ('block-type/name', e.g. custom-webhook/cxr-drift) a drift alarm is "
                          "sent through, by the automation 'cxr-screen deploy' creates.")
    pause_on_drift: bool = Field(False, description="A drift alarm also pauses the nightly-screening deployment "
                                                    "until a person resumes it.")
    dask_address: str | None = Field(None, description="Screen on this Dask cluster (tcp://HOST:8786): see README "
                                                       "(environment only).")
    synthetic: str = Field("s3://cxr/datasets/synthetic/{version}",
                           description="Where the synthesize deployment writes its synthetic dataset ('{version}': "
                                       "the generator's version).")
    generator_store: str = Field("s3://cxr/generators", description="Where the synthesize deployment publishes "
                                                                    "generators.")
    synthesize_class: str | None = Field(None, description="The class the synthesize deployment synthesises.")
    synthesize_count: int | None = Field(None, description="Synthetic images per synthesize run.")
    cpu_pool: str = Field("cpu", description="Work pool of nightly screening.")
    gpu_pool: str = Field("gpu", description="Work pool of retraining and synthesis.")
    project_dir: str = Field(str(PROJECT_DIR), description="Project folder the process workers run flows from "
                                                           "(environment only).")

    def screen_parameters(self) -> ScreenParameters:
        return ScreenParameters(incoming_uri=self.incoming, results_uri=self.results, model_store_uri=self.model_store,
                                **_given(batch_size=self.screen_batch_size, chunk_size=self.screen_chunk_size,
                                         engine=self.screen_engine, explain=self.screen_explain,
                                         max_file_bytes=self.screen_max_file_bytes,
                                         decode_timeout_seconds=self.screen_decode_timeout_seconds,
                                         abandoned_after_minutes=self.screen_abandoned_after_minutes,
                                         chunk_timeout_minutes=self.screen_chunk_timeout_minutes,
                                         workers=self.screen_workers, dask_address=self.dask_address,
                                         drift_window=self.screen_drift_window, since=self.screen_since,
                                         deliver_to=self.screen_deliver_to, uid_root=self.uid_root,
                                         delivery_max_nights=self.delivery_max_nights))

    def train_parameters(self) -> TrainParameters:
        return TrainParameters(dataset_uri=self.dataset, model_store_uri=self.model_store, weights=self.weights,
                               **_given(epochs=self.train_epochs, fine_tune_epochs=self.train_fine_tune_epochs,
                                        input_size=self.train_input_size,
                                        require_approval=self.train_require_approval,
                                        min_auc=self.train_min_auc, min_specificity=self.train_min_specificity,
                                        acceptance_bound=self.train_acceptance_bound,
                                        scope_pass_rate=self.train_scope_pass_rate,
                                        dataset_prefixes=_listed(self.train_dataset_prefixes),
                                        scope_negatives_uri=self.train_scope_negatives))

    def synthesize_parameters(self) -> SynthesizeParameters:
        return SynthesizeParameters(dataset_uri=self.dataset, out_uri=self.synthetic,
                                    generator_store_uri=self.generator_store, weights=self.weights,
                                    **_given(synthetic_class=self.synthesize_class, count=self.synthesize_count,
                                             input_size=self.train_input_size))


def _given(**values) -> dict:
    """The settings that are set; the rest take the flow's defaults."""
    return {name: value for name, value in values.items() if value is not None}


def _listed(text: str | None) -> list[str] | None:
    """A comma-separated setting as a list; None when unset."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]
