"""Offline training jobs (train, evaluate or predict DeepLab): what a user asks and what the job runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.stages import STAGES, Stage
from contract.webhooks import CALLBACK_HELP
from rib_core.config.network_configs import DeepLabTrainConfig


class TrainingJobInputs(BaseModel):
    """What an offline DeepLab job reads and how it trains (the request's fields and the payload's)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "evaluate", "predict"] = Field(description="train a DeepLab on the manifest's masks, "
                                                                "score a checkpoint on them, or predict masks")
    manifest: str = Field(description="s3:// URI of a manifest (pseudo-masks to train on, or images to score); "
                                      "its records are frozen at submit")
    checkpoint: str | None = Field(None, description="DeepLab checkpoint for evaluate and predict (yours: an input "
                                                     "location, or a file of one of your own jobs)")
    evaluate_on: str | None = Field(None, description="train: s3:// manifest with ground truth to evaluate and "
                                                      "predict once trained")
    config: DeepLabTrainConfig = Field(default_factory=DeepLabTrainConfig,
                                       description="DeepLab settings "
                                                   "(rib_core.config.network_configs.DeepLabTrainConfig)")
    callback_url: str | None = Field(None, description=CALLBACK_HELP)


class TrainingJobRequest(TrainingJobInputs):
    """An offline DeepLab job as a user asks it. Where it writes is the service's choice (the job's
    own prefix, ``jobs/<id>/training/``), never a request's."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "kind": "train", "manifest": "s3://data/voc/pseudo_masks.jsonl", "evaluate_on": "s3://data/voc/val.jsonl",
        "config": {"arch": "resnet101", "iterations": 30000}}]})

    @model_validator(mode="before")
    @classmethod
    def _no_output(cls, data: Any) -> Any:
        if isinstance(data, dict) and "output" in data:
            raise ValueError("output is chosen by the service: a training job writes under its own prefix "
                             "(jobs/<id>/training/, shown as result.output); leave output out")
        return data


class TrainingSpec(TrainingJobInputs):
    """What an offline training job runs (:func:`rib_core.deeplab.job.run_training_job`), signed in
    its record (``jobs/<id>/training/training.json``): the inputs with their manifests frozen
    (digests checked before use) and the output set. A job of one stage, ``training``."""

    output: str = Field(description="the job's own prefix")
    owner: str = Field("", description="digest of the API key that made the job (its callback is signed for it)")
    manifest_sha256: str
    evaluate_on_sha256: str | None = None
    request: dict[str, Any] = Field(default_factory=dict, description="the request as it was sent (shown on status)")

    @property
    def chunks(self) -> list[list[str]]:
        return []

    @property
    def total(self) -> int:
        return 0

    def stages(self) -> list[Stage]:
        return [s.name for s in STAGES if s.job == "training"]

    def skipped(self) -> list[Stage]:
        return []
