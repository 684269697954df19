"""Site validation before serving: score a site's labelled X-rays with a stored model version.

Reads top to bottom as the steps: load the version (checked as screening checks it), the
criteria, the site's images (as training reads them, at the version's preprocessing), which of
them to score, the figures of the training audit on them with the comparison against the card's
own test figures and the verdict, then the evaluation beside the version (signed like its card)
and under ``output_uri``. With CXR_REQUIRE_EVALUATION=true a version serves only after a passing one.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from flows.parameters import EvaluateParameters
from store import storage
from store.clock import utc_timestamp
from store.evaluations import new_evaluation_id
from tasks.site_evaluation import (
    criteria_for,
    evaluation_record,
    load_version,
    measure,
    publish_evaluation,
    select_images,
)
from tasks.train_data import discover, load_labelled


@dataclass(frozen=True)
class SiteEvaluation:
    record: dict  # evaluation.json's content
    outputs: dict[str, str]  # 'evaluation': its evaluation.json in the store; 'output': the --output folder

    @property
    def fit(self) -> bool:
        return bool(self.record["verdict"]["fit"])


@flow(name="evaluate", description="Score a labelled site dataset with a stored model version; keep the evaluation "
                                   "beside the version.")
def evaluate(params: EvaluateParameters) -> SiteEvaluation:
    # Absolute locations: the evaluation records where its images were, for readers in other folders.
    params = params.model_copy(update={name: storage.join(getattr(params, name))
                                       for name in ("dataset_uri", "model_store_uri", "output_uri")
                                       if getattr(params, name) is not None})
    model, card, card_digest = load_version(params.model_store_uri, params.model_version)
    criteria = criteria_for(card, params.min_auc, params.min_specificity, params.acceptance_bound)
    dataset = discover(params.dataset_uri)
    loaded = load_labelled(dataset.items, card.spec())
    selection = select_images(loaded, card, params.dataset_uri, params.where)
    figures, reliability = measure(model, card, loaded, selection, params.strata, criteria, params.bootstrap,
                                   params.seed)
    record = evaluation_record(new_evaluation_id(), card, card_digest, params.dataset_uri, loaded, selection, figures,
                               params.bootstrap, utc_timestamp())
    written, outputs = publish_evaluation(params.model_store_uri, card, record, reliability, params.output_uri)
    return SiteEvaluation(written, outputs)
