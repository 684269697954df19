"""One typed parameters model per flow: the flow takes it, the command line builds its options
from it, and the deployments fill it from the settings. Each default and check is written here once."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from imaging.defaults import DECODE_TIMEOUT_SECONDS
from model.acceptance import Acceptance
from model.defaults import BATCH_SIZE, EPOCHS, HEAD, MAX_STRATA

__all__ = ["MAX_CHUNK_SIZE", "AuditParameters", "EvaluateParameters", "ScreenParameters", "SynthesizeParameters",
           "TrainParameters"]


# The largest chunk a screening run may ask for. A chunk keeps every row it screened in memory until
# it writes its part file (a flagged row carries two 160 px JPEGs: 12.8 KB in the part file, so
# 4,096 flagged rows ~52 MB), and a failed chunk is retried whole; at the 10.5 img/s bench/scale_bench.py
# takes for a two-core fp32 worker, 4,096 images take 6.5 minutes, a ninth of the default chunk
# timeout (60 minutes), which leaves room for Grad-CAM on every image and slow storage.
MAX_CHUNK_SIZE = 4096


class _Parameters(BaseModel):
    # Unknown names are mistakes (a typo in a deployment's parameters must not pass silently).
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def default(cls, name: str):
        return cls.model_fields[name].default

    @classmethod
    def describe(cls, name: str) -> str:
        return cls.model_fields[name].description or ""


class ScreenParameters(_Parameters):
    incoming_uri: str = Field(description="Folder or s3:// prefix with incoming X-rays (searched recursively).")
    results_uri: str = Field("results", description="Where run folders and the ledger go (folder or s3://).")
    model_store_uri: str = Field("models", description="Model store (folder or s3://).")
    model_version: str = Field("production", description="A version in the store, or 'production'.")
    batch_size: int = Field(BATCH_SIZE, ge=1, le=1024,
                            description="Images per forward pass (throughput is flat from 8 up; memory is not).")
    chunk_size: int = Field(256, ge=1, json_schema_extra={"maximum": MAX_CHUNK_SIZE},
                            description=f"Images per Prefect task (at most {MAX_CHUNK_SIZE}).")
    limit: int | None = Field(None, ge=0, description="Screen at most this many new images.")
    explain: Literal["flagged", "all", "none"] = Field(
        "flagged", description="Which images get a Grad-CAM overlay and cam_lung_share (from the forward pass's "
                               "maps; a float32 pass of their own where the engine's explanations have not passed "
                               "their gate, and auto then prefers an engine whose have).")
    engine: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="What runs the forward pass: 'auto' takes the fastest engine validated for the model "
                            "version (model/inference.py) on this machine, timed here once a week "
                            "(CXR_ENGINE_SPEEDS); 'fp32' is the reference.")
    max_file_bytes: int = Field(
        128 * 1024 * 1024, ge=1024,
        description="Inputs larger than this (from stat, or the S3 object's size, before reading) get a rejected row; "
                    "the largest real CXR files are about 40 MB.")
    decode_timeout_seconds: float = Field(
        DECODE_TIMEOUT_SECONDS, gt=0, description="An input whose decoding takes longer is stopped and gets a rejected row.")
    abandoned_after_minutes: float = Field(
        30.0, gt=0, description="A run whose lease was not renewed for this long is taken for dead and its rows "
                                "published (at once when Prefect already shows its flow run as finished).")
    chunk_timeout_minutes: float = Field(
        60.0, gt=0, description="A chunk still running after this long is stopped and retried (a hung read "
                                "must not hold the night's only concurrency slot).")
    frontal_chest_only: bool = Field(
        True, description="Reject DICOM studies that are not frontal chest radiographs (Modality not CR/DX/DR, "
                          "another body part, a lateral view) with that reason, instead of screening them.")
    deidentify: bool = Field(
        False, description="Replace the DICOM study, series and instance UIDs and the accession number in the rows "
                           "with keyed hashes (key: CXR_DEIDENTIFY_KEY), the same token for the same study.")
    drift_window: int = Field(
        14, ge=3, le=29, description="Accepted nights of this model version that make the drift reference once there "
                                     "are 3 of them (until then, the model's test split); looked for among the last 29 runs.")
    since: str | None = Field(
        None, pattern=r"^[1-9][0-9]{0,3}[dw]$",
        description="With a PACS location (dicomweb+http://...): only studies dated within this window before the "
                    "run's day, e.g. 1d (yesterday and today) or 2w; DICOM's StudyDate has a day's resolution.")
    deliver_to: str | None = Field(
        None, pattern=r"^(dicomweb\+https?://\S+|dimse://\S+)$",
        description="Send each PACS image's results back as DICOM (a TID 1500 SR; for a flagged image its heat map "
                    "as a Secondary Capture): dicomweb+http(s)://HOST:PORT/ROOT (STOW-RS) or dimse://AET@HOST:PORT "
                    "(C-STORE). What fails is retried on later runs.")
    uid_root: str = Field(
        "2.25", pattern=r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*$", max_length=40,
        description="The UID root of the DICOM objects delivered (the site's; default 2.25, UUID-derived).")
    delivery_max_nights: int = Field(
        3, ge=1, le=30, description="Runs on which a delivery may fail before it waits for a person "
                                    "('cxr-screen deliveries RESULTS --retry').")
    workers: int | None = Field(
        None, ge=1, le=256, description="Screen on a local Dask cluster of this many processes (threads sized so "
                                        "that the cores are shared, not oversubscribed). Unset: in this process.")
    dask_address: str | None = Field(
        None, pattern=r"^(tcp|tls|ws|wss|inproc)://\S+$",
        description="Screen on an existing Dask cluster (tcp://HOST:8786). Its workers need the model store and "
                    "results (s3://) and the Prefect API (PREFECT_API_URL) within reach.")

    @field_validator("chunk_size")
    @classmethod
    def _bounded_chunk(cls, value: int) -> int:
        if value > MAX_CHUNK_SIZE:
            raise PydanticCustomError(
                "chunk_size_too_large",
                "at most {cap} images per chunk, not {value}: a chunk holds every row it screened (flagged ones with "
                "two pictures) in memory until it writes them, and is retried whole; screen more images with more "
                "chunks, not larger ones", {"cap": MAX_CHUNK_SIZE, "value": value})
        return value

    @model_validator(mode="after")
    def _one_place_to_run(self):
        if self.workers is not None and self.dask_address is not None:
            raise ValueError("workers and dask_address exclude each other: a local cluster or an existing one")
        for name in ("incoming_uri", "deliver_to"):
            value = getattr(self, name) or ""
            if value.startswith("dicomweb+") and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
                raise ValueError(f"{name}: credentials do not belong in a location (they would be kept in Prefect and "
                                 "the results); set CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN")
        if self.deliver_to is not None and self.deidentify:
            raise ValueError("deliver_to and deidentify exclude each other: results filed back into the PACS need "
                             "the studies' own UIDs, which de-identified rows do not keep")
        return self


class TrainParameters(_Parameters):
    dataset_uri: str = Field(description="Labelled dataset: class sub-folders or a manifest.csv (folder or s3://).")
    model_store_uri: str = Field("models", description="Model store (folder or s3://).")
    dataset_prefixes: list[str] | None = Field(
        None, description="Where training may read datasets from (folders or s3:// prefixes); a dataset_uri "
                          "elsewhere (say, named by an event) is refused before anything is read. Unset: anywhere.")
    positive: str = Field("covid", description="The class to flag (COVID-19); binary mode trains it vs the rest.")
    multiclass: bool = Field(False, description="One output per class folder instead of binary.")
    epochs: int = Field(EPOCHS, ge=1, description="Most stage 1 epochs (head on cached features, base frozen); "
                                              "early stopping usually ends it sooner.")
    fine_tune_epochs: int = Field(0, ge=0, description="Stage 2 epochs fine-tuning block5 (0: no stage 2).")
    batch_size: int = Field(BATCH_SIZE, ge=1, le=1024, description="Images per training step.")
    input_size: int = Field(224, ge=32, le=1024, description="Images are resized to this square size.")
    weights: str = Field("imagenet", description="'imagenet' (download), a weights file path or s3:// URI, or 'none'.")
    seed: int = Field(0, description="Seed of the split, initialisation, augmentation and shuffling.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of patients held out for testing.")
    target_sensitivity: float = Field(0.95, gt=0, le=1,
                                      description="Sensitivity the threshold is chosen for, on out-of-fold predictions "
                                                  "of the training images (on validation after stage 2).")
    augment_draws: int = Field(3, ge=1, description="Augmented copies of the training set whose features are cached.")
    augment_head: bool = Field(
        False, description="Let the linear head's cross-validation also try augmented copies of the training images "
                           "(off: at 224 px they lost to the images as they are on held-out data, bench/validity_bench.py).")
    horizontal_flip: bool = Field(False, description="Augment with mirror images (off: anatomy is not symmetric).")
    class_weights: bool = Field(True, description="Weight classes inversely to their frequency.")
    scale_mode: Literal["unit", "caffe"] = Field(
        "unit", description="'unit' ([0, 1], the paper) or 'caffe' (Keras VGG16 ImageNet scaling).")
    force_promote: bool = Field(False, description="Make the new model production even if it is not better, carries "
                                                   "a shortcut warning the production model does not, or falls below "
                                                   "its plain baseline; never one not fit for screening (a person "
                                                   "promotes that with 'cxr-screen models promote').")
    require_approval: bool = Field(False, description="Leave a new model as a candidate, whatever its metrics, until "
                                                      "someone runs 'cxr-screen models promote VERSION'.")
    strata: list[str] | None = Field(
        None, description="Manifest columns to evaluate within (default: every extra column with 2 to 20 levels "
                          "that is not an identifier, hash, path or size).")
    max_strata: int = Field(
        MAX_STRATA, ge=1, le=1000,
        description="Most manifest columns to evaluate within (each is bootstrapped): beyond it the default's extra "
                    "columns (by name) are dropped and named in the log and the card; naming more is refused.")
    balance_strata: str | None = Field(
        "auto", description="Manifest column(s), joined by '+', whose levels are balanced by class in training and "
                            "early stopping, so the label says nothing about the level; 'auto': each, and jointly, "
                            "every stratum "
                            "that predicts the label on its own in the training split (metadata-only AUC >= 0.6); "
                            "'none': off.")
    mixed_strata_only: bool = Field(False, description="With balance_strata: leave out levels that hold one class only "
                                                       "(by default they keep their class-balanced weight).")
    leave_out: str | None = Field(None, pattern=r"^[^=]+=.+$",
                                  description="COL=LEVEL: train without that level and report performance on it.")
    calibrate: bool = Field(True, description="Calibrate the probabilities (temperature and class bias) on "
                                              "out-of-fold predictions of the training images (on validation after "
                                              "stage 2); the threshold is then chosen on calibrated probabilities.")
    head: Literal["linear", "mlp"] = Field(
        HEAD, description="'linear' (standardised pooled features, L2 logistic regression; weighting and C chosen "
                              "by patient-grouped cross-validation) or 'mlp' (the tutorial's Dense(64)-dropout head, "
                              "trained with epochs on validation).")
    bootstrap: int = Field(1000, ge=100, description="Patient-level bootstrap resamples for confidence intervals.")
    min_auc: float = Field(
        Acceptance.min_auc, ge=0, le=1,
        description="Acceptance: the test split's AUC (lower 95 % bound, or the estimate with acceptance_bound "
                    "'point') must reach this, or the model is registered as a candidate 'not fit for screening'.")
    min_specificity: float = Field(
        Acceptance.min_specificity, ge=0, le=1,
        description="Acceptance: specificity on the test split at the threshold chosen for target_sensitivity "
                    "(lower 95 % bound, or the estimate) must reach this.")
    acceptance_bound: Literal["lower", "point"] = Field(
        Acceptance.bound, description="Judge min_auc and min_specificity on the lower 95 % patient-bootstrap bound "
                                      "('lower') or on the estimate ('point').")
    synthetic_uri: str | None = Field(
        None, description="A synthetic dataset written by 'cxr-screen synthesize' from this dataset with this seed and "
                          "test fraction: its images of the minority class join the training split only (never "
                          "validation or test).")
    synthetic_share: float = Field(
        0.3, gt=0, lt=1, description="With synthetic_uri: the most the synthetic images may make up of the minority "
                                     "class's training images (0.3: at most 3 in 10).")
    scope_pass_rate: float = Field(
        0.99, ge=0.5, lt=1, description="The scope gate's threshold passes this share of real X-rays like the training "
                                        "ones (chosen on out-of-fold scores of the training images; model/scope.py).")
    scope_negatives_uri: str | None = Field(
        None, description="An out-of-scope set (a folder with one subfolder per kind) the card reports the scope "
                          "gate's rejection rates on; by default training builds one (store/out_of_scope.py).")


class AuditParameters(TrainParameters):
    """A leave-one-level-out audit: the training parameters (each fold trains as ``train`` does;
    registry, calibration, leave-out and bootstrap settings do not apply), plus the column whose
    levels are left out."""

    by: str = Field(description="Manifest column whose levels are left out of training, one fold each.")
    output_uri: str = Field("audit", description="Where the audit table and plot are written (folder or s3://).")


class SynthesizeParameters(_Parameters):
    """Train a class-conditional GAN on a dataset's training split and publish synthetic images of one
    class, with the generator as a versioned bundle, if it passes the memorisation check."""

    dataset_uri: str = Field(description="Labelled dataset: class sub-folders or a manifest.csv (folder or s3://).")
    out_uri: str = Field(description="Where the synthetic dataset goes (class folder and manifest.csv; folder or "
                                     "s3://), refused if it holds any file already or overlaps the dataset; "
                                     "'{version}' in it becomes the generator's version (a new folder each run).")
    synthetic_class: str = Field("covid", description="The class to synthesise (usually the minority class).")
    count: int = Field(200, ge=1, le=100_000, description="Synthetic images to write.")
    generator_store_uri: str = Field("generators", description="Generator store: one bundle per version "
                                                               "(folder or s3://).")
    seed: int = Field(0, description="Seed of the split (use train's), the GAN's training and the images' noise.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of patients held out for testing (use train's).")
    image_size: Literal[64, 128, 256] = Field(
        64, description="Side of the synthetic images in pixels (64 at least: the image loader refuses smaller X-rays).")
    epochs: int = Field(60, ge=1, description="Passes of the GAN over the training split.")
    width: int = Field(32, ge=4, le=256, description="Channels of the generator's last block (doubling towards 4x4).")
    batch_size: int = Field(32, ge=2, le=1024, description="Images per GAN training step.")
    weights: str = Field("imagenet", description="Base weights of the feature space the checks measure in: "
                                                 "'imagenet', a weights file path or s3:// URI, or 'none'.")
    input_size: int = Field(224, ge=32, le=1024, description="Input size of that feature space (the classifier's).")


class EvaluateParameters(_Parameters):
    """Score a labelled site dataset with a stored model version and keep the evaluation beside it.
    Acceptance criteria left unset come from the version's card (training's own criteria), else
    model.acceptance's defaults."""

    dataset_uri: str = Field(description="Labelled site dataset: class sub-folders or a manifest.csv "
                                         "(folder or s3://).")
    model_store_uri: str = Field("models", description="Model store (folder or s3://).")
    model_version: str = Field("production", description="A version in the store, or 'production'.")
    output_uri: str | None = Field(None, description="Also write evaluation.json, evaluation.md and reliability.png "
                                                     "here (folder or s3://).")
    where: list[Annotated[str, StringConstraints(pattern=r"^[^=]+=.+$")]] = Field(
        default_factory=list, description="COL=LEVEL: score only images with this manifest level (several levels of "
                                          "one column: any of them; several columns: all).")
    strata: list[str] | None = Field(None, description="Manifest columns to evaluate within (default: every extra "
                                                       "column with 2 to 20 levels among the images scored).")
    min_auc: float | None = Field(None, ge=0, le=1, description="Acceptance: AUC on the site (lower 95 % bound, or "
                                                                "the estimate) must reach this (default: the card's).")
    min_specificity: float | None = Field(
        None, ge=0, le=1, description="Acceptance: specificity at the card's threshold (lower 95 % bound, or the "
                                      "estimate) must reach this (default: the card's).")
    acceptance_bound: Literal["lower", "point"] | None = Field(
        None, description="Judge on the lower 95 % bound or on the estimate (default: the card's).")
    bootstrap: int = Field(1000, ge=100, description="Patient-level bootstrap resamples for confidence intervals.")
    seed: int = Field(0, description="Seed of the bootstrap and of the cross-fitted metadata baseline's folds.")
