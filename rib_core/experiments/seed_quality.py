"""Seed quality of CAM vs RIB-GAP vs RIB-GNDRP on one set of images (the paper's Table 5c)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rib_core.classifier.cam import CamConfig, run_cam
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import EvalConfig
from rib_core.data.datasets import load_manifest, load_mask, median_long_side
from rib_core.data.evaluation import all_background_miou, sweep_folder, write_report
from rib_core.rib.batching import run_rib
from rib_core.rib.companions import CompanionPool
from rib_core.training.checkpoints import load_classifier


class SeedQualityConfig(BaseModel):
    """Which RIB variants to compare; the RIB settings apply to every variant but the pooling."""

    model_config = ConfigDict(extra="forbid")

    rib: RibConfig = Field(default_factory=RibConfig)
    cam: CamConfig = Field(default_factory=CamConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    taus: list[float] = Field(default_factory=lambda: [0.4])  # Table 5c also reports 0.3 and 0.5
    limit: int | None = Field(None, ge=1, description="only the first N images of the manifest")
    companions: str | None = Field(None, description="companion manifest (default: the evaluated manifest)")


def compare_pooling(classifier: str, manifest_uri: str, out_dir: str | os.PathLike[str],
                    cfg: SeedQualityConfig | None = None, device: str = "cpu", progress: bool = True,
                    ) -> dict[str, Any]:
    """Maps of every variant under ``out_dir/<variant>/`` and ``out_dir/seed_quality.json``."""
    cfg = cfg or SeedQualityConfig()
    manifest = load_manifest(manifest_uri)
    if cfg.limit:
        manifest = manifest.subset([r.id for r in manifest.records[: cfg.limit]])
    if not all(r.mask for r in manifest.records):
        raise ValueError("every image needs a ground-truth mask to score seeds")
    model, _, _ = load_classifier(classifier, manifest.classes)
    out = Path(out_dir)
    companions = load_manifest(cfg.companions) if cfg.companions else manifest
    pool = CompanionPool.from_manifest(companions)
    fitted, sizes = cfg.rib.fitted_to(median_long_side(companions))
    variants: dict[str, Path] = {"CAM": run_cam(model, manifest, out / "cam", cfg.cam, device, progress)}
    variants["RIB-GAP"] = run_rib(model, manifest, pool, out / "rib_gap", fitted.model_copy(update={"pooling": "gap"}),
                                  device, progress)
    for tau in cfg.taus:
        rib = fitted.model_copy(update={"pooling": "gndrp", "tau": tau})
        variants[f"RIB-GNDRP (tau={tau})"] = run_rib(model, manifest, pool, out / f"rib_gndrp_{tau}", rib, device,
                                                     progress)
    gts = {r.id: load_mask(manifest.mask_uri(r)) for r in manifest.records}
    rows = []
    for method, folder in variants.items():
        sweep = sweep_folder(folder, manifest, cfg.evaluation)
        best = sweep["best"]
        rows.append({"method": method, "miou": best["miou"], "threshold": sweep["best_threshold"],
                     "precision": best["precision"], "recall": best["recall"], "f1": best["f1"],
                     "curve": sweep["curve"]})
    report = {"images": len(gts), "all_background_miou": all_background_miou(gts.values(), len(manifest.classes)),
              "rows": rows, "sizes": sizes, "config": cfg.model_copy(update={"rib": fitted}).model_dump()}
    write_report(report, out / "seed_quality.json")
    return report
