"""Image in, pseudo-masks out: what a worker does for each image, usable from a notebook too.

One :class:`PseudoMaskPipeline` holds the shared classifier, the companion pool and (optionally)
a trained IRN, loaded once; :meth:`PseudoMaskPipeline.process` runs RIB on one image, then
refinement (seed + CRF, and IRN's random walk when an IRN model is given), and
:meth:`ImageResult.artifacts` turns the result into the files users download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rib_core.classifier.cam import LocalizationMap
from rib_core.config.rib_config import RibConfig, RibPlan, image_seed
from rib_core.config.stage_configs import RefineConfig
from rib_core.data.datasets import load_manifest
from rib_core.io.artifacts import Artifacts, encode_result
from rib_core.refine.irn import IrnNet, load_irn
from rib_core.refine.pseudo_masks import refine_one
from rib_core.rib.batching import RibBatcher
from rib_core.rib.companions import DEFAULT_CACHE_BYTES, POOLS, CompanionPool
from rib_core.rib.process import RibRunner
from rib_core.training.augment import normalize, to_chw
from rib_core.training.checkpoints import load_classifier
from rib_core.training.networks import CamNet

# An image sent without labels gets the classes whose probability is above this (the classifier's own
# decision point, where rib eval-classifier measures F1), or its most probable class when none is.
LABEL_THRESHOLD = 0.5


class PipelineConfig(BaseModel):
    """RIB and refinement settings of one run."""

    model_config = ConfigDict(extra="forbid")

    rib: RibConfig = Field(default_factory=RibConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ImageResult:
    image_id: str
    classes: list[str]          # the labels of this image, in class-list order
    map: LocalizationMap        # RIB's M
    masks: dict[str, np.ndarray]  # "seed", "crf", optionally "irn", and "mask" (the final one)
    stats: dict[str, Any]

    def artifacts(self, image: np.ndarray) -> Artifacts:
        """Files for users (:func:`rib_core.io.artifacts.encode_result`): the map, pseudo-masks, overlays."""
        meta = {"image_id": self.image_id, "classes": self.classes, "stats": self.stats}
        return encode_result(image, self.map, self.masks, meta)


class PseudoMaskPipeline:
    """The shared state of a worker process and the per-image work on top of it."""

    def __init__(self, model: CamNet, classes: Sequence[str], pool: CompanionPool, irn: IrnNet | None = None,
                 device: str = "auto", config: PipelineConfig | None = None) -> None:
        self.device = resolve_device(device)
        self.classes = list(classes)
        if pool.classes != self.classes:
            raise ValueError("the companion manifest's class list differs from the classifier's: "
                             f"{pool.classes} vs {self.classes}")
        self.config = config or PipelineConfig()
        self.model = model.eval()
        self.runner = RibRunner(model, pool, self.config.rib, self.device)
        self.batcher = RibBatcher(self.runner)
        self.irn = irn.to(self.device).eval() if irn is not None else None

    @classmethod
    def load(cls, classifier_uri: str, companion_manifest_uri: str, irn_uri: str | None = None,
             device: str = "auto", config: PipelineConfig | None = None, companion_limit: int | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES, disk_cache: str | None = None) -> PseudoMaskPipeline:
        """Load the classifier and the IRN from paths or s3:// URIs, with the process's companion
        pool of the manifest (:data:`~rib_core.rib.companions.POOLS`: read lazily, ``cache_bytes`` of
        decoded images at most, s3:// images kept in ``disk_cache`` when given)."""
        companions = load_manifest(companion_manifest_uri, verify_files=False)
        model, classes, _ = load_classifier(classifier_uri, companions.classes)
        pool = POOLS.get(companions, companion_limit, cache_bytes, disk_cache)
        irn = load_irn(irn_uri)[0] if irn_uri else None
        return cls(model, classes, pool, irn, device, config)

    def keys_for(self, labels: Sequence[str]) -> list[int]:
        unknown = sorted(set(labels) - set(self.classes))
        if unknown or not labels:
            raise ValueError(f"labels must be a non-empty subset of {self.classes}; unknown: {unknown}")
        return sorted({self.classes.index(c) for c in labels})

    @torch.no_grad()
    def predict_labels(self, image: np.ndarray) -> list[str]:
        """The classes the classifier sees in ``image`` (:data:`LABEL_THRESHOLD`), for an image sent
        without labels."""
        logits = self.model.logits(to_chw(normalize(image))[None].to(self.device))[0]
        probabilities = torch.sigmoid(logits.float()).cpu().numpy()
        chosen = np.flatnonzero(probabilities > LABEL_THRESHOLD).tolist() or [int(probabilities.argmax())]
        return [self.classes[i] for i in chosen]

    def process(self, image: np.ndarray, labels: Sequence[str], rib: RibConfig | None = None,
                image_id: str = "", refine: RefineConfig | None = None) -> ImageResult:
        """RIB and refinement for one image; raises what fails."""
        result = self.process_many([image], [labels], rib, [image_id], refine)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def process_many(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[str]],
                     rib: RibConfig | None = None, image_ids: Sequence[str] | None = None,
                     refine: RefineConfig | None = None, plan: RibPlan | None = None,
                     ) -> list[ImageResult | Exception]:
        """RIB (batched where ``rib.engine`` says so: by default on CUDA) and refinement for several
        images. Each image's RIB seed follows from its id (:func:`~rib_core.config.rib_config.image_seed`),
        as in ``rib rib``, so both paths give an image the same M; images without an id share the
        id "". An image with no labels gets the classifier's (:meth:`predict_labels`; its stats
        say ``labels_from``). ``rib`` and ``refine`` default to the pipeline's config; ``plan`` is
        ``rib.plan`` on this device as the caller's task resolved it (resolved here when not given). A
        failing image gets its exception in place of a result; the others go on."""
        cfg = rib or self.config.rib
        refine_cfg = refine or self.config.refine
        ids = list(image_ids) if image_ids is not None else [""] * len(images)
        results: dict[int, ImageResult | Exception] = {}
        keys: dict[int, list[int]] = {}
        for j, names in enumerate(labels):
            try:
                keys[j] = self.keys_for(names or self.predict_labels(images[j]))
            except (ValueError, RuntimeError) as e:  # unknown labels; the classifier out of memory
                results[j] = e
        plan = plan or cfg.plan(str(self.device))
        engine = plan.engine
        todo = sorted(keys)
        outcomes = self.batcher.run_all([images[j] for j in todo], [keys[j] for j in todo], cfg,
                                        [image_seed(cfg.seed, ids[j]) for j in todo], plan)
        for j, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Exception):
                results[j] = outcome
                continue
            try:
                masks = refine_one(images[j], outcome.map, self.irn, refine_cfg, device=self.device)
            except Exception as e:  # one image's refinement failing must not lose the others
                results[j] = e.with_traceback(None)
                continue
            results[j] = ImageResult(ids[j], [self.classes[k] for k in keys[j]], outcome.map, masks,
                                     {**outcome.stats(), "device": str(self.device), "engine": engine,
                                      "labels_from": "request" if labels[j] else "classifier"})
        return [results[j] for j in range(len(images))]
