"""``rib reproduce voc|coco``: the paper's whole chain on the real data, each stage beside the paper's figure.

Users of the official code report that they cannot reach its figures (jbeomlee93/RIB issues #5 and
#6: VOC mask 67.1 and DeepLab 65.3 against 70.6 and 68.3, COCO mask 39.9 against 45.6) and cannot
tell which stage lost the points. This runs the chain with the authors' settings (the presets of
:mod:`rib_core.config.presets`: ``run_sample.py``, ``obtain_RIB_CAM.py`` and their COCO twins; DeepLab as
appendix A.1) and, after every stage, prints the measured figure beside the paper's, warning when
they differ by more than ``margin`` points. The paper's side (its figures, the authors' settings, its
data sets) is :mod:`rib_core.experiments.paper`.

Stages, each the function the pipeline job and the demo use (:mod:`rib_core.jobs.stages`):

``data``        manifests from the VOC devkit (+ SBD's lists for train_aug) or the COCO folder
``classifier``  IRN's ``train_cam`` recipe from the ImageNet weights (:func:`classifier_stage`)
``cam``         CAM of the scored training images and its seed sweep: the baseline RIB improves on
``maps``        RIB maps M of every training image (:func:`maps_stage`)
``seeds``       the seed sweep of M (the paper's "Seed")
``refine``      seed + CRF, confident labels, IRN, random walk (:func:`refine_stage`)
``deeplab``     DeepLab on the pseudo-masks (VOC: with re-training), scored on val (:func:`deeplab_stage`)

Everything lives in one output folder with the job's layout (``classifier/``, ``maps/``,
``refined/``) plus ``data/``, ``cam/``, ``deeplab/`` and ``stages/<stage>.json``: a stage whose
marker exists is skipped (its figures are printed again from the marker), and a stage killed half
way continues from what its folder holds (training states, finished maps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.classifier.cam import CamConfig
from rib_core.config.network_configs import ClassifierTrainConfig, DeepLabTrainConfig
from rib_core.config.presets import merge
from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import EvalConfig, RefineConfig
from rib_core.data.datasets import Manifest, load_manifest
from rib_core.experiments.paper import (
    DEFAULT_MARGIN,
    PAPER,
    UNPAIRED_LABELS,
    DataInputs,
    Dataset,
    authors_settings,
    import_data,
)

STAGES = ("data", "classifier", "cam", "maps", "seeds", "refine", "deeplab")
Say = Callable[[str], None]


# --smoke: every stage in seconds on tiny images, to check a set-up end to end (figures meaningless).
SMOKE: dict[str, Any] = {
    "classifier": {"epochs": 1, "batch_size": 4, "crop_size": 64, "resize_long": [56, 72]},
    "cam": {"scales": [1.0]},
    "rib": {"iterations": 2, "companions": 2, "crop_size": 64, "resize_long": [56, 72], "loss_scales": [1.0],
            "map_scales": [1.0]},
    "refine": {"irn": {"crop_size": 64, "batch_size": 4, "epochs": 1, "radius": 5}, "walk": {"exp_times": 2}},
    "deeplab": {"iterations": 2, "batch_size": 2, "crop_size": 64, "scales": [1.0], "checkpoint_every": 1},
    "train_limit": 32, "val_limit": 8,
}


class ReproduceConfig(BaseModel):
    """Settings of every stage; ``dataset`` fills the authors' values where none is given."""

    model_config = ConfigDict(extra="forbid")

    dataset: Dataset = "voc"
    classifier: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)  # IRN's train_cam
    cam: CamConfig = Field(default_factory=CamConfig)
    rib: RibConfig = Field(default_factory=RibConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    deeplab: DeepLabTrainConfig = Field(default_factory=DeepLabTrainConfig)
    train_limit: int | None = Field(None, ge=1, description="only the first N training images (smoke runs)")
    val_limit: int | None = Field(None, ge=1, description="only the first N validation images (smoke runs)")
    margin: float = Field(DEFAULT_MARGIN, ge=0, description="warn when a figure is further than this "
                          "(mIoU points) from the paper's")

    @model_validator(mode="before")
    @classmethod
    def _authors_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        dataset = data.get("dataset", "voc")
        if dataset not in PAPER:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(PAPER)}")
        return merge(authors_settings(dataset), data)


def _scored(train: Manifest) -> Manifest:
    """The training images with ground truth: VOC's train split, COCO's whole train split."""
    return train.subset([r.id for r in train.records if r.mask is not None])


class Reproduction:
    """One run over an output folder: the stages in order, each skipped when its marker exists."""

    def __init__(self, out: Path, cfg: ReproduceConfig, inputs: DataInputs, device: str, progress: bool,
                 say: Say) -> None:
        self.out, self.cfg, self.inputs, self.device, self.progress, self.say = out, cfg, inputs, device, progress, say
        self.paper = PAPER[cfg.dataset]
        self.results: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ markers and figures

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's output depends on, kept in its marker."""
        parts = {"data": ("train_limit", "val_limit"), "classifier": ("classifier",), "cam": ("cam", "evaluation"),
                 "maps": ("rib",), "seeds": ("evaluation",), "refine": ("refine",), "deeplab": ("deeplab",)}[stage]
        return self.cfg.model_dump(mode="json", include=set(parts))

    def run(self, stage: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``work()`` unless the stage's marker exists; then its figures beside the paper's."""
        path = self.marker(stage)
        if path.exists():
            done = json.loads(path.read_text())
            self.say(f"[{stage}] done before (to redo it, delete {path} and the stage's output)")
            if done["settings"] != self.settings(stage):
                self.say(f"warning: [{stage}] ran with other settings than this run's; its output is kept")
            result = done["result"]
        else:
            self.say(f"[{stage}] running")
            result = work()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": self.settings(stage), "result": result}, indent=2, default=float))
            os.replace(tmp, path)
        self.results[stage] = result
        self.report(stage, result)
        return result

    def report(self, stage: str, result: dict[str, Any]) -> None:
        for key, measured in result.get("figures", {}).items():
            paper = self.paper.get(key)
            if paper is None:
                self.say(f"  {UNPAIRED_LABELS[key]:<34} measured {100 * measured:5.1f}   (no figure in the paper)")
                continue
            diff = 100 * measured - paper.value
            self.say(f"  {paper.label:<34} measured {100 * measured:5.1f}   paper {paper.value:5.1f} "
                     f"({paper.source})   {diff:+.1f}")
            if abs(diff) > self.cfg.margin:
                self.say(f"warning: {paper.label} is {diff:+.1f} points from the paper's {paper.value} "
                         f"(margin {self.cfg.margin:g})")
        for note in result.get("notes", []):
            self.say(f"  {note}")

    # ------------------------------------------------------------------ stages

    @property
    def train(self) -> Manifest:
        return load_manifest(self.out / "data" / "train.jsonl")

    @property
    def checkpoint(self) -> Path:
        return self.out / "classifier" / "classifier.pth"

    def data(self) -> dict[str, Any]:
        counts = import_data(self.cfg.dataset, self.inputs, self.out / "data", self.cfg.train_limit,
                             self.cfg.val_limit)
        return {**counts, "notes": [f"{counts['train_images']} training images ({counts['scored_train_images']} "
                                    f"with ground truth, scored), {counts['val_images']} val images"]}

    def classifier(self) -> dict[str, Any]:
        from rib_core.jobs.stages import classifier_stage

        report = classifier_stage(self.out, self.train, self.cfg.classifier, self.out / "data" / "val.jsonl",
                                  self.device, progress=self.progress)
        notes = [report["summary"]] + ([f"warning: {report['warning']}"] if report["warning"] else [])
        return {"val_map": report["val_map"], "notes": notes,
                "figures": {} if report["val_map"] is None else {"classifier_map": report["val_map"]}}

    def cam(self) -> dict[str, Any]:
        from rib_core.classifier.cam import run_cam
        from rib_core.training.checkpoints import load_classifier

        scored = _scored(self.train)
        maps = run_cam(load_classifier(self.checkpoint)[0], scored, self.out / "cam", self.cfg.cam, self.device,
                       self.progress)
        return self._sweep("cam_seed", maps, scored)

    def maps(self) -> dict[str, Any]:
        from rib_core.jobs.stages import maps_stage

        train = self.train
        maps_stage(self.out, train, [r.id for r in train.records], self.checkpoint, self.cfg.rib, self.device,
                   self.progress)
        return {"images": len(train)}

    def seeds(self) -> dict[str, Any]:
        return self._sweep("seed", self.out / "maps", _scored(self.train))

    def _sweep(self, key: str, maps: Path, scored: Manifest) -> dict[str, Any]:
        from rib_core.data.evaluation import sweep_folder

        sweep = sweep_folder(maps, scored, self.cfg.evaluation)
        best = sweep["best"]
        return {"figures": {key: best["miou"]}, "threshold": sweep["best_threshold"], "images": sweep["images"],
                "precision": best["precision"], "recall": best["recall"],
                "notes": [f"{sweep['images']} images, best background threshold {sweep['best_threshold']:.2f} of "
                          f"the sweep; precision {100 * best['precision']:.1f}, recall {100 * best['recall']:.1f}"]}

    def refine(self) -> dict[str, Any]:
        from rib_core.jobs.stages import refine_stage

        report = refine_stage(self.out, self.train, self.checkpoint, self.cfg.refine, self.device,
                              progress=self.progress)
        figures = {"seed_crf": report["seeds_crf"]["miou"], "mask": report["masks"]["miou"]}
        notes = []
        if "ir_labels" in report:
            labels = report["ir_labels"]
            notes.append(f"IRN's confident labels: mIoU {100 * labels['miou']:.1f}, "
                         f"{100 * labels['ignored_fraction']:.1f}% of pixels left unlabelled")
        return {"figures": figures, "manifests": report["manifests"], "notes": notes,
                "seed_threshold": report["seed_threshold"]}

    def deeplab(self) -> dict[str, Any]:
        from rib_core.jobs.stages import deeplab_stage

        cfg = self.cfg.deeplab
        manifests = self.results["refine"]["manifests"]
        # Appendix A.1: VOC re-trains from the walk's three-way labels; COCO trains on the masks.
        labels = manifests["retrain_labels"] if cfg.retrain and "retrain_labels" in manifests else \
            manifests["pseudo_masks"]
        summary = deeplab_stage(labels, str(self.out / "deeplab"), cfg, str(self.out / "data" / "val.jsonl"),
                                self.device)
        notes = [] if cfg.arch == "resnet101" else [
            f"DeepLab's backbone is {cfg.arch}; the paper's figure is DeepLab-v2-ResNet101 (--deeplab-weights)"]
        return {"figures": {"deeplab": summary["evaluation"]["miou"]}, "steps": summary["steps"],
                "rounds": summary["rounds"], "notes": notes}


def run_reproduce(out_dir: str | os.PathLike[str], inputs: DataInputs, cfg: ReproduceConfig,
                  device: str = "cpu", progress: bool = True, stop_after: str | None = None,
                  say: Say = print) -> dict[str, Any]:
    """Every stage in order into ``out_dir`` (see the module doc), up to ``stop_after`` if given.
    Writes and returns ``reproduce.json``: each stage's result with the paper's figures beside."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"unknown stage {stop_after!r}; the stages are {', '.join(STAGES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Reproduction(out, cfg, inputs, device, progress, say)
    for stage in STAGES:
        run.run(stage, getattr(run, stage))
        if stage == stop_after:
            break
    summary = {"dataset": cfg.dataset, "margin": cfg.margin, "stages": run.results,
               "paper": {k: vars(v) for k, v in run.paper.items()}, "config": cfg.model_dump(mode="json")}
    (out / "reproduce.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
