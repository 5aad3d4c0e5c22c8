"""The request bodies of the API, typed, so that OpenAPI (``/docs``) shows every field a request may set.

A request's ``rib``, ``refine``, ``classifier`` and ``deeplab`` hold only the fields it changes; their
models are derived from the stage configs themselves (:func:`fields_of`), with the same fields, bounds
and descriptions, so that a field added to a config is in the API at once. What a partial body cannot
check (rules across fields, the operator's defaults it is merged into) the config checks once merged
(:mod:`service.validation`).
"""

from __future__ import annotations

from copy import copy
from functools import cache
from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, Field, create_model

from contract.webhooks import CALLBACK_HELP
from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import RefineConfig, StageConfig
from service.schemas import example


def _no_default(schema: dict[str, Any]) -> None:
    """A field left out takes the service's default (RIB_*_DEFAULTS, or the preset's), not the config's."""
    schema.pop("default", None)


@cache
def fields_of(config: type[StageConfig]) -> type[BaseModel]:
    """A model of ``config``'s fields, each optional (left out: the default stays), with its type,
    bounds and description; nested configs become partial too. Rules across fields are the config's
    (checked once the request is merged into the service's defaults), so are presets."""
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, StageConfig):
            annotation = fields_of(annotation)
        field = copy(info)
        field.default, field.default_factory, field.json_schema_extra = None, None, _no_default
        fields[name] = (annotation, field)
    return create_model(f"{config.__name__}Fields", __doc__=f"The fields of {config.__name__} a request changes; "
                        "each one left out keeps the service's default.",
                        __config__=example(config().model_dump(mode="json"), extra="forbid"), **fields)


RibFields = fields_of(RibConfig)
RefineFields = fields_of(RefineConfig)
ClassifierFields = fields_of(ClassifierTrainConfig)
DeepLabFields = fields_of(DeepLabTrainConfig)


class JobRequest(BaseModel):
    """A bulk job: a manifest (``s3://...`` JSONL, the rib-manifest format) or an inline list of records."""

    model_config = example({"manifest_uri": "s3://data/cats/manifest.jsonl", "rib": {"iterations": 10},
                            "refine": {"use_irn": False}}, extra="forbid")

    manifest_uri: str | None = Field(None, description="s3:// URI of a JSONL manifest; relative paths resolve "
                                                       "against its folder")
    images: list[Any] | None = Field(None, description='inline records instead of a manifest: {"id", "image" '
                                                       '(s3:// URI), "labels"}, checked as manifest lines')
    rib: RibFields = Field(default_factory=RibFields, description="RIB parameters overriding the service's "
                                                                  "defaults (RibConfig)")
    refine: RefineFields = Field(default_factory=RefineFields, description="refinement settings overriding the "
                                                                           "service's defaults (RefineConfig)")
    callback_url: str | None = Field(None, description=CALLBACK_HELP)


class PipelineRequest(BaseModel):
    """A data set through every stage: classifier, RIB maps, refinement (IRN), optionally DeepLab."""

    model_config = example({"manifest_uri": "s3://data/voc/train.jsonl", "classifier": {"epochs": 5},
                            "rib": {"preset": "voc"}, "deeplab": {"iterations": 20000}}, extra="forbid")

    manifest_uri: str = Field(description="s3:// URI of the data set's JSONL manifest (its header names the "
                                          "classes; masks, if any, are used to score every stage)")
    classifier_uri: str | None = Field(None, description="start from this classifier checkpoint instead of "
                                                         "training one")
    val_manifest_uri: str | None = Field(None, description="labelled manifest the classifier is scored on each "
                                                           "epoch (default: the data set)")
    classifier: ClassifierFields = Field(default_factory=ClassifierFields, description="classifier training "
                                                                                       "(ClassifierTrainConfig)")
    rib: RibFields = Field(default_factory=RibFields, description="RIB parameters overriding the service's "
                                                                  "defaults (RibConfig)")
    refine: RefineFields = Field(default_factory=RefineFields, description="refinement and IRN training overriding "
                                                                           "the service's defaults (RefineConfig)")
    deeplab: DeepLabFields | None = Field(None, description="set (even {}): train DeepLab on the pseudo-masks "
                                                            "(DeepLabTrainConfig)")
    callback_url: str | None = Field(None, description=CALLBACK_HELP)


class UploadForm(BaseModel):
    """One image and its class names, as a multipart form."""

    model_config = example({"labels": ["cat", "dog"], "image_id": "cat_001", "rib": '{"iterations": 10}'})

    file: UploadFile = Field(description="the image (PNG, JPEG, ...)")
    labels: list[str] = Field(description="class names: repeat the field or separate them by commas")
    image_id: str | None = Field(None, description="result folder name; default: the file name")
    rib: str | None = Field(None, description="JSON object of RIB parameters overriding the defaults (the fields "
                                              "of RibConfigFields)")
    refine: str | None = Field(None, description="JSON object of refinement settings overriding the defaults (the "
                                                 "fields of RefineConfigFields)")
    callback_url: str | None = Field(None, description=CALLBACK_HELP)
