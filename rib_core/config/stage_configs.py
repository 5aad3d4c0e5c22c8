"""The typed settings of the refinement stages (CRF, confident labels, IRN, the random walk, the
seed sweep) and what every stage config shares (its base, bounds and help texts), importable
without torch.

Each stage's module (:mod:`rib_core.refine.crf`, :mod:`rib_core.refine.confident_labels`,
:mod:`rib_core.refine.random_walk`, :mod:`rib_core.refine.irn_training`, :mod:`rib_core.data.evaluation`,
:mod:`rib_core.refine.pseudo_masks`) runs with the config defined here; the API process validates
requests (``refine``) with the same objects and never loads torch; its OpenAPI shows each field's
description, written here. The classifier's and DeepLab's are in :mod:`rib_core.config.network_configs`.
Defaults cite the paper or the official code (IRN, jbeomlee93/RIB, deeplab-pytorch) on each field.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.config.presets import Preset, with_preset

ModelKind = Literal["deeplabv2", "deeplabv3"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]  # the keys of networks.BACKBONES
# Bounds on what sizes a worker's memory or time, so that no request can take a worker down (a crop of
# 100,000 px asked 112 GiB). Each is far above the paper's settings (crops 321-512, batches 10-32,
# 3-5 epochs, 30k-100k DeepLab iterations) and below what one 80 GB GPU runs.
MAX_CROP = 1024        # training and companion crops, and resize_long
MAX_BATCH = 256
MAX_EPOCHS = 1000
MAX_ITERATIONS = 1_000_000
MAX_WORKERS = 16       # data-loader processes
SideRange = tuple[Annotated[int, Field(ge=16, le=MAX_CROP)], Annotated[int, Field(ge=16, le=MAX_CROP)]]


def _defaults_example(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """A config's JSON schema (the API's OpenAPI) shows its defaults as the example."""
    schema["examples"] = [cls().model_dump(mode="json")]


class StageConfig(BaseModel):
    """Base of every stage's settings: unknown fields are refused (a typo never passes silently), and
    each field carries its description (the API derives its request bodies from these classes and
    shows it; so could the CLI's help)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_defaults_example)


class CrfConfig(StageConfig):
    """Dense CRF parameters; defaults are IRN's ``crf_inference_label`` (misc/imutils.py)."""

    # RIB/IRN use unary_from_labels
    unary: Literal["labels", "probabilities"] = Field(
        "labels", description="labels: the unary from a hard label map (with gt_prob); probabilities: from "
                              "softmax scores")
    iterations: int = Field(10, ge=1, le=100, description="mean-field steps")  # crf_inference_label t=10
    # crf_inference_label gt_prob=0.7 ("labels" only)
    gt_prob: float = Field(0.7, gt=0, lt=1, description="confidence given to the label map (unary labels)")
    # addPairwiseGaussian(sxy=3, compat=3)
    gaussian_sxy: float = Field(3.0, gt=0, description="smoothness kernel: spatial standard deviation (px)")
    gaussian_compat: float = Field(3.0, ge=0, description="smoothness kernel: weight")
    # addPairwiseBilateral(sxy=50, srgb=5, compat=10)
    bilateral_sxy: float = Field(50.0, gt=0, description="appearance kernel: spatial standard deviation (px)")
    bilateral_srgb: float = Field(5.0, gt=0, description="appearance kernel: colour standard deviation")
    bilateral_compat: float = Field(10.0, ge=0, description="appearance kernel: weight")


# RIB run_sample.py --cam_eval_thres: the seed threshold the confident-label thresholds were set beside
REFERENCE_SEED_THRESHOLD = 0.15


class ConfidentLabelConfig(StageConfig):
    """Confident foreground / background labels for IRN (``step/cam_to_ir_label.py``)."""

    # RIB run_sample.py --conf_fg_thres 0.35 (IRN: 0.30)
    fg_threshold: float = Field(0.35, gt=0, lt=1, description="background score of the seed whose CRF gives the "
                                                              "confident foreground")
    # RIB run_sample.py --conf_bg_thres 0.17 (IRN: 0.05)
    bg_threshold: float = Field(0.17, gt=0, lt=1, description="background score (below fg_threshold) of the seed "
                                "whose CRF gives the confident background; pixels between the two are ignored")
    crf: CrfConfig = Field(default_factory=CrfConfig,  # crf_inference_label with its defaults
                           description="the CRF run on each of the two seeds")
    # This project's option, off as in the official code: with a seed threshold t below RIB's
    # --cam_eval_thres (0.15), both thresholds are scaled by t / 0.15, so that maps too faint to pass
    # 0.35 over the object (a map that covers only its most discriminative part) still give confident
    # foreground around the seed actually used. Above 0.15 they stay: scaled up, 0.35 went past 0.95
    # on the demo's maps (seed 0.66) and IRN lost its foreground (docs/RESULTS.md notes).
    follow_seed: bool = Field(False, description="below RIB's seed threshold 0.15, scale both thresholds by "
                                                 "seed_threshold / 0.15 (confident labels from faint maps)")

    @model_validator(mode="after")
    def _ordered(self) -> ConfidentLabelConfig:
        if self.bg_threshold >= self.fg_threshold:
            raise ValueError("bg_threshold must be below fg_threshold")
        return self

    def at_seed(self, seed_threshold: float) -> ConfidentLabelConfig:
        """The thresholds used with seeds at ``seed_threshold``: as given, or with ``follow_seed``
        both scaled by ``seed_threshold / REFERENCE_SEED_THRESHOLD`` when that is below 1."""
        scale = min(1.0, seed_threshold / REFERENCE_SEED_THRESHOLD)
        if not self.follow_seed or scale == 1.0:
            return self
        return self.model_copy(update={"fg_threshold": self.fg_threshold * scale,
                                       "bg_threshold": self.bg_threshold * scale, "follow_seed": False})


# VOC: the field defaults (run_sample.py). COCO: run_sample_coco.py --sem_seg_bg_thres 0.22.
WALK_PRESETS: dict[str, dict[str, Any]] = {"voc": {}, "coco": {"bg_threshold": 0.22}}


PRESET_HELP = "voc or coco: the authors' settings for that data set fill the fields not given"


class RandomWalkConfig(StageConfig):
    """Random walk on IRN's affinities (``step/make_sem_seg_labels.py``, ``misc/indexing.py``);
    ``preset`` fills the data-set-specific values not given."""

    preset: Preset = Field("voc", description=PRESET_HELP)
    beta: float = Field(10.0, gt=0, description="exponent sharpening the affinities")  # run_sample.py --beta 10
    # --exp_times 8: 2^8 steps
    exp_times: int = Field(8, ge=0, le=12, description="log2 of the walk's steps (8: 256 steps)")
    # propagate_to_edge(radius=5)
    radius: int = Field(5, ge=2, le=10, description="neighbourhood radius of the transition matrix (map px)")
    # RIB run_sample.py --np_power 1.3 (IRN: 1.0)
    power: float = Field(1.3, gt=0, description="the map is raised to this power before the walk")
    # --sem_seg_bg_thres 0.27
    bg_threshold: float = Field(0.27, gt=0, lt=1, description="background score of the pseudo-mask after the walk")
    # DeepLab re-training labels (paper appendix A.1): walk value > 0.3 foreground, < 0.2
    # background, 255 between. Not in the public code (which stops at the masks).
    retrain_fg_threshold: float = Field(0.3, gt=0, lt=1, description="re-training labels: a walked score above "
                                                                     "it is foreground")
    retrain_bg_threshold: float = Field(0.2, gt=0, lt=1, description="re-training labels: below it background; "
                                                                     "between the two, ignored (255)")
    # Not in IRN's or RIB's code (false): their walk's mask is final. AffinityNet's paper (Ahn and
    # Kwak, CVPR 2018), the walk's predecessor, reports its walk's labels refined by a dense CRF as
    # well; rib tune tries both (TuneConfig.walk_crf).
    crf: bool = Field(False, description="refine the walk's mask by a dense CRF (refine.crf's pairwise terms, "
                                         "IRN's label unary), as seed + CRF is")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, WALK_PRESETS)

    @model_validator(mode="after")
    def _ordered(self) -> RandomWalkConfig:
        if self.retrain_bg_threshold >= self.retrain_fg_threshold:
            raise ValueError("retrain_bg_threshold must be below retrain_fg_threshold")
        return self

    def tuned(self, exp_times: int, bg_threshold: float, crf: bool | None = None) -> RandomWalkConfig:
        """This walk with another length and background score, and with or without the CRF after it
        (``crf`` None: as it is; ``rib tune``'s choice); DeepLab's re-training thresholds keep their
        offsets from the background score (the paper's 0.3 / 0.2 around RIB's 0.27)."""
        shift = bg_threshold - self.bg_threshold
        return self.model_copy(update={
            "exp_times": exp_times, "bg_threshold": bg_threshold, "crf": self.crf if crf is None else crf,
            "retrain_fg_threshold": round(min(0.99, self.retrain_fg_threshold + shift), 4),
            "retrain_bg_threshold": round(max(0.01, self.retrain_bg_threshold + shift), 4)})


LR_HELP = "initial learning rate (polynomial decay to 0)"
MOMENTUM_HELP = "SGD momentum"
WEIGHT_DECAY_HELP = "SGD weight decay"
POLY_HELP = "exponent of the polynomial learning-rate decay"
WORKERS_HELP = "data-loader processes (0: load in the training process)"
SEED_HELP = "random seed of the crops, flips and order"
CROP_HELP = "side of the square training crops (px)"
RESIZE_HELP = "each image is resized to a random long side in this range (px) before cropping"


class IrnTrainConfig(StageConfig):
    """IRN training; defaults are the RIB/IRN ``run_sample.py`` and ``step/train_irn.py`` ones."""

    arch: Backbone = Field("resnet50", description="backbone (IRN: resnet50)")
    # IRN starts from ImageNet weights (resnet50(pretrained=True)). Give a torchvision state dict or
    # a classifier checkpoint (ours or IRN's res50_cam.pth) whose backbone to use; None = the
    # classifier passed to train_irn / refine_maps (never a random backbone: see irn_backbone).
    init_weights: str | None = Field(None, description="backbone weights, path or s3://: a torchvision ResNet state "
                                     "dict or a classifier checkpoint; null: the job's classifier")
    # --irn_crop_size 512
    crop_size: int = Field(512, ge=32, le=MAX_CROP, multiple_of=16, description=CROP_HELP)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="images per step")  # --irn_batch_size 32
    epochs: int = Field(3, ge=1, le=MAX_EPOCHS, description="passes over the data set")  # --irn_num_epoches 3
    lr: float = Field(0.1, gt=0, description=LR_HELP)  # --irn_learning_rate 0.1 (x10 on the displacement head)
    weight_decay: float = Field(1e-4, ge=0, description=WEIGHT_DECAY_HELP)  # --irn_weight_decay 1e-4
    # PolyOptimizer passes weight_decay as momentum (optim.py)
    momentum: float = Field(1e-4, ge=0, description=MOMENTUM_HELP)
    poly_power: float = Field(0.9, gt=0, description=POLY_HELP)  # PolyOptimizer's exponent
    # train_irn.py PathIndex(radius=10)
    radius: int = Field(10, ge=2, le=20, description="radius of the pixel pairs the affinities are learnt on "
                                                     "(map px)")
    # VOC12AffinityDataset rescale=(0.5, 1.5)
    rescale: tuple[float, float] = Field((0.5, 1.5), description="random rescaling range of the training images")
    hflip: bool = Field(True, description="random horizontal flips")  # hor_flip=True
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description=WORKERS_HELP)
    seed: int = Field(0, description=SEED_HELP)

    @model_validator(mode="after")
    def _crop_fits_radius(self) -> IrnTrainConfig:
        side = self.crop_size // 4  # the networks' stride-4 map
        if side <= 2 * (self.radius - 1):
            raise ValueError(f"crop_size {self.crop_size} gives a {side}x{side} map, too small for radius "
                             f"{self.radius}: use radius <= {side // 2} or a larger crop")
        return self


# The seed sweeps of RIB's run_sample.py (VOC: i / 100 for i in range(20, 50)) and
# run_sample_coco.py (COCO: range(10, 51), i.e. 0.10-0.50 by 0.01).
EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    "coco": {"thresholds": [round(0.01 * i, 2) for i in range(10, 51)]},
}


def wide_thresholds() -> list[float]:
    """0.05-0.90 by 0.01: a sweep for data whose best background threshold is unknown (the VOC
    sweep's 0.20-0.49 brackets VOC's best; this project's choice for other data)."""
    return [round(0.05 + 0.01 * i, 2) for i in range(86)]


class EvalConfig(StageConfig):
    """Seed evaluation; ``preset`` fills the data-set-specific sweep when none is given."""

    preset: Preset = Field("voc", description=PRESET_HELP)
    # RIB reports the best seed over background thresholds; we sweep 0.20-0.49 by 0.01
    # (the range used for the paper's seeds; IRN's single default is --cam_eval_thres 0.15).
    thresholds: list[float] = Field(default_factory=lambda: [round(0.20 + 0.01 * i, 2) for i in range(30)],
                                    description="background thresholds the seeds are scored at (with ground truth)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, EVAL_PRESETS)


# The parts whose settings differ between the authors' VOC and COCO runs take the preset; the
# confident labels and IRN training use the same values on both (run_sample_coco.py).
REFINE_PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    "coco": {"walk": {"preset": "coco"}, "evaluation": {"preset": "coco"}},
}


class RefineConfig(StageConfig):
    """Everything from maps to pseudo-masks; ``preset`` is handed to the parts not given one."""

    preset: Preset = Field("voc", description=PRESET_HELP + " (handed to walk and evaluation)")
    # Seed threshold of seed + CRF, this project's baseline (RIB's code has no such step; its
    # --cam_eval_thres, the eval_cam threshold). With ground truth, refine_maps uses the best
    # threshold of the seed sweep instead (paper 4.2.1, following SEAM).
    seed_threshold: float = Field(REFERENCE_SEED_THRESHOLD, gt=0, lt=1,
                                  description="background score of the seed that the CRF refines")
    threshold_from_sweep: bool = Field(True, description="with ground truth, use the best threshold of the seed "
                                                         "sweep instead of seed_threshold")
    crf: CrfConfig = Field(default_factory=CrfConfig, description="the CRF of seed + CRF")
    labels: ConfidentLabelConfig = Field(default_factory=ConfidentLabelConfig,
                                         description="the confident labels IRN is trained on")
    irn: IrnTrainConfig = Field(default_factory=IrnTrainConfig, description="IRN training")
    walk: RandomWalkConfig = Field(default_factory=RandomWalkConfig, description="the random walk that makes the "
                                                                                 "pseudo-masks")
    # paper 3.3: pseudo-masks come from IRN on M; False stops at seed + CRF
    use_irn: bool = Field(True, description="pseudo-masks from IRN's random walk; false: stop at seed + CRF")
    # RIB-Sal (paper 3.3): a saliency value above this (of 255) is foreground. The official code
    # has no saliency step; 0.5 is this project's choice.
    saliency_threshold: float = Field(0.5, gt=0, lt=1, description="RIB-Sal: a saliency above this share of 255 is "
                                                                   "foreground (images with a saliency map only)")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="how seeds are scored against ground "
                                                                           "truth")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, REFINE_PRESETS)
