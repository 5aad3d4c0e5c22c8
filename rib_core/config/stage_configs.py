"""The typed settings of every stage after RIB, importable without torch.

Each stage's module (:mod:`rib_core.refine.crf`, :mod:`rib_core.refine.confident_labels`,
:mod:`rib_core.refine.random_walk`, :mod:`rib_core.refine.irn_training`, :mod:`rib_core.data.evaluation`,
:mod:`rib_core.refine.pseudo_masks`, :mod:`rib_core.deeplab.job`) runs with the config defined here; the API
process validates requests (``refine``, training jobs) with the same objects and never loads torch.
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

class CrfConfig(BaseModel):
    """Dense CRF parameters; defaults are IRN's ``crf_inference_label`` (misc/imutils.py)."""

    model_config = ConfigDict(extra="forbid")

    unary: Literal["labels", "probabilities"] = "labels"  # RIB/IRN use unary_from_labels
    iterations: int = Field(10, ge=1, le=100)              # crf_inference_label t=10
    gt_prob: float = Field(0.7, gt=0, lt=1)                # crf_inference_label gt_prob=0.7 ("labels" only)
    gaussian_sxy: float = Field(3.0, gt=0)                 # addPairwiseGaussian(sxy=3, compat=3)
    gaussian_compat: float = Field(3.0, ge=0)
    bilateral_sxy: float = Field(50.0, gt=0)               # addPairwiseBilateral(sxy=50, srgb=5, compat=10)
    bilateral_srgb: float = Field(5.0, gt=0)
    bilateral_compat: float = Field(10.0, ge=0)


class ConfidentLabelConfig(BaseModel):
    """Confident foreground / background labels for IRN (``step/cam_to_ir_label.py``)."""

    model_config = ConfigDict(extra="forbid")

    fg_threshold: float = Field(0.35, gt=0, lt=1)  # RIB run_sample.py --conf_fg_thres 0.35 (IRN: 0.30)
    bg_threshold: float = Field(0.17, gt=0, lt=1)  # RIB run_sample.py --conf_bg_thres 0.17 (IRN: 0.05)
    crf: CrfConfig = Field(default_factory=CrfConfig)  # crf_inference_label with its defaults

    @model_validator(mode="after")
    def _ordered(self) -> ConfidentLabelConfig:
        if self.bg_threshold >= self.fg_threshold:
            raise ValueError("bg_threshold must be below fg_threshold")
        return self


# VOC: the field defaults (run_sample.py). COCO: run_sample_coco.py --sem_seg_bg_thres 0.22.
WALK_PRESETS: dict[str, dict[str, Any]] = {"voc": {}, "coco": {"bg_threshold": 0.22}}


class RandomWalkConfig(BaseModel):
    """Random walk on IRN's affinities (``step/make_sem_seg_labels.py``, ``misc/indexing.py``);
    ``preset`` fills the data-set-specific values not given."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "voc"
    beta: float = Field(10.0, gt=0)               # run_sample.py --beta 10
    exp_times: int = Field(8, ge=0, le=12)        # --exp_times 8: 2^8 steps
    radius: int = Field(5, ge=2, le=10)           # propagate_to_edge(radius=5)
    power: float = Field(1.3, gt=0)               # RIB run_sample.py --np_power 1.3 (IRN: 1.0)
    bg_threshold: float = Field(0.27, gt=0, lt=1)  # --sem_seg_bg_thres 0.27
    # DeepLab re-training labels (paper appendix A.1): walk value > 0.3 foreground, < 0.2
    # background, 255 between. Not in the public code (which stops at the masks).
    retrain_fg_threshold: float = Field(0.3, gt=0, lt=1)
    retrain_bg_threshold: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, WALK_PRESETS)

    @model_validator(mode="after")
    def _ordered(self) -> RandomWalkConfig:
        if self.retrain_bg_threshold >= self.retrain_fg_threshold:
            raise ValueError("retrain_bg_threshold must be below retrain_fg_threshold")
        return self

    def tuned(self, exp_times: int, bg_threshold: float) -> RandomWalkConfig:
        """This walk with another length and background score (``rib tune``'s choice); DeepLab's
        re-training thresholds keep their offsets from the background score (the paper's 0.3 / 0.2
        around RIB's 0.27)."""
        shift = bg_threshold - self.bg_threshold
        return self.model_copy(update={
            "exp_times": exp_times, "bg_threshold": bg_threshold,
            "retrain_fg_threshold": round(min(0.99, self.retrain_fg_threshold + shift), 4),
            "retrain_bg_threshold": round(max(0.01, self.retrain_bg_threshold + shift), 4)})


class IrnTrainConfig(BaseModel):
    """IRN training; defaults are the RIB/IRN ``run_sample.py`` and ``step/train_irn.py`` ones."""

    model_config = ConfigDict(extra="forbid")

    arch: Backbone = Field("resnet50", description="backbone (IRN: resnet50)")
    # IRN starts from ImageNet weights (resnet50(pretrained=True)). Give a torchvision state dict or
    # a classifier checkpoint (ours or IRN's res50_cam.pth) whose backbone to use; None = the
    # classifier passed to train_irn / refine_maps (never a random backbone: see irn_backbone).
    init_weights: str | None = None
    crop_size: int = Field(512, ge=32, le=MAX_CROP, multiple_of=16)  # --irn_crop_size 512
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)      # --irn_batch_size 32
    epochs: int = Field(3, ge=1, le=MAX_EPOCHS)          # --irn_num_epoches 3
    lr: float = Field(0.1, gt=0)                         # --irn_learning_rate 0.1 (x10 on the displacement head)
    weight_decay: float = Field(1e-4, ge=0)              # --irn_weight_decay 1e-4
    momentum: float = Field(1e-4, ge=0)                  # PolyOptimizer passes weight_decay as momentum (optim.py)
    poly_power: float = Field(0.9, gt=0)                 # PolyOptimizer's exponent
    radius: int = Field(10, ge=2, le=20)                 # train_irn.py PathIndex(radius=10)
    rescale: tuple[float, float] = (0.5, 1.5)            # VOC12AffinityDataset rescale=(0.5, 1.5)
    hflip: bool = True                                   # hor_flip=True
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    seed: int = 0

    @model_validator(mode="after")
    def _crop_fits_radius(self) -> IrnTrainConfig:
        side = self.crop_size // 4  # the networks' stride-4 map
        if side <= 2 * (self.radius - 1):
            raise ValueError(f"crop_size {self.crop_size} gives a {side}x{side} map, too small for radius "
                             f"{self.radius}: use radius <= {side // 2} or a larger crop")
        return self


# The from-scratch recipe's values where they differ from IRN's (measured on MNIST scenes of
# several recipes: docs/USAGE.md "The classifier", benchmarks/classifier_recipes.py). A setting given
# explicitly wins over these.
SCRATCH_RECIPE: dict[str, Any] = {
    "arch": "resnet18", "batch_size": 8, "epochs": 12, "lr": 1e-3, "weight_decay": 0.05,
    "warmup_epochs": 1, "from_scratch": True, "colour_augment": True,
}


class ClassifierTrainConfig(BaseModel):
    """Classifier training; defaults are IRN's (``run_sample.py`` and ``step/train_cam.py``).

    ``recipe="scratch"`` replaces the defaults by :data:`SCRATCH_RECIPE` (explicit settings win).
    """

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["irn", "scratch"] = "irn"
    arch: Backbone = Field("resnet50", description="backbone: resnet18/34/50/101 (IRN: resnet50)")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)  # IRN run_sample.py --cam_batch_size 16
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)      # --cam_num_epoches 5
    lr: float = Field(0.1, gt=0)             # --cam_learning_rate 0.1 (x10 on the classifier)
    weight_decay: float = Field(1e-4, ge=0)  # --cam_weight_decay 1e-4
    momentum: float = Field(1e-4, ge=0)      # what IRN's PolyOptimizer really passes to SGD (optim.py)
    poly_power: float = Field(0.9, gt=0)     # PolyOptimizer's exponent
    warmup_epochs: float = Field(0, ge=0, description="scratch recipe: linear warm-up before the cosine decay")
    crop_size: int = Field(512, ge=16, le=MAX_CROP)  # train_cam.py crop_size=512
    resize_long: SideRange = (320, 640)              # train_cam.py resize_long=(320, 640)
    hflip: bool = True
    colour_augment: bool = Field(False, description="random channel order and greyscale (scratch recipe)")
    # IRN fine-tunes ImageNet weights: stem frozen, stage 2 detached, BN statistics frozen. From
    # scratch (the demo: no ImageNet weights here) every stage must learn, with batch statistics
    # that are then frozen for CAM and RIB. See CamNet.set_from_scratch.
    from_scratch: bool = False
    init_weights: str | None = Field(None, description="backbone weights, path or s3://: a torchvision ResNet "
                                     "state dict or a classifier checkpoint (ours or IRN's)")
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") == "scratch":
            return {**SCRATCH_RECIPE, **data}
        return data


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


class EvalConfig(BaseModel):
    """Seed evaluation; ``preset`` fills the data-set-specific sweep when none is given."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "voc"
    # RIB reports the best seed over background thresholds; we sweep 0.20-0.49 by 0.01
    # (the range used for the paper's seeds; IRN's single default is --cam_eval_thres 0.15).
    thresholds: list[float] = Field(default_factory=lambda: [round(0.20 + 0.01 * i, 2) for i in range(30)])

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


class RefineConfig(BaseModel):
    """Everything from maps to pseudo-masks; ``preset`` is handed to the parts not given one."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "voc"
    # Seed threshold of seed + CRF, this project's baseline (RIB's code has no such step; 0.15 is
    # the value of --cam_eval_thres, its eval_cam threshold). With ground truth, refine_maps uses the
    # best threshold of the seed sweep instead (paper 4.2.1, following SEAM).
    seed_threshold: float = Field(0.15, gt=0, lt=1)
    threshold_from_sweep: bool = True
    crf: CrfConfig = Field(default_factory=CrfConfig)
    labels: ConfidentLabelConfig = Field(default_factory=ConfidentLabelConfig)
    irn: IrnTrainConfig = Field(default_factory=IrnTrainConfig)
    walk: RandomWalkConfig = Field(default_factory=RandomWalkConfig)
    use_irn: bool = True  # paper 3.3: pseudo-masks come from IRN on M; False stops at seed + CRF
    # RIB-Sal (paper 3.3): a saliency value above this (of 255) is foreground. The official code
    # has no saliency step; 0.5 is this project's choice.
    saliency_threshold: float = Field(0.5, gt=0, lt=1)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, REFINE_PRESETS)


# deeplab-pytorch's DenseCRF settings (configs/voc12.yaml CRF: ITER_MAX 10, POS_W 3, POS_XY_STD 1,
# BI_W 4, BI_XY_STD 67, BI_RGB_STD 3) on softmax probabilities.
DEEPLAB_CRF = CrfConfig(unary="probabilities", iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0,
                        bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)

# Appendix A.1: VOC batch 10, 30k iterations, lr 2.0e-4, crop 321 (section 4.1), re-training;
# COCO batch 10, 100k iterations, lr 2.5e-4, crop 481 (section 4.1), no re-training.
DEEPLAB_PRESETS: dict[str, dict[str, Any]] = {
    "voc": {"iterations": 30_000, "lr": 2.0e-4, "crop_size": 321, "retrain": True},
    "coco": {"iterations": 100_000, "lr": 2.5e-4, "crop_size": 481, "retrain": False},
}


class DeepLabTrainConfig(BaseModel):
    """DeepLab training and inference; ``preset`` fills the dataset-specific values not given."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["voc", "coco"] = "voc"
    model: ModelKind = "deeplabv2"                  # paper 4.1: DeepLab-v2-ResNet101 of [42]
    arch: Backbone = "resnet101"                    # paper 4.1 (resnet18/34/50 for tests and small jobs)
    atrous_rates: list[int] = Field(default_factory=lambda: [6, 12, 18, 24])  # voc12.yaml ATROUS_RATES
    msc_scales: list[float] = Field(default_factory=lambda: [0.5, 0.75])      # DeepLabV2_ResNet101_MSC scales
    freeze_bn: bool = True                          # main.py: model.module.base.freeze_bn()
    # Paper 4.1: "an initial model pre-trained on the ImageNet dataset". Path or s3:// URI of a
    # torchvision ResNet state dict, a CAM classifier or a DeepLab checkpoint; never downloaded.
    init_weights: str | None = None
    batch_size: int = Field(10, ge=1, le=MAX_BATCH)  # appendix A.1 (deeplab-pytorch: 5 x ITER_SIZE 2)
    iterations: int = Field(30_000, ge=1, le=MAX_ITERATIONS)  # appendix A.1 VOC (COCO 100k; voc12.yaml: 20k)
    lr: float = Field(2.0e-4, gt=0)                 # appendix A.1 VOC (COCO 2.5e-4; voc12.yaml LR 2.5e-4)
    head_lr_mult: float = Field(10.0, gt=0)         # main.py get_params "10x" (biases "20x", no decay)
    momentum: float = Field(0.9, ge=0)              # voc12.yaml MOMENTUM 0.9
    weight_decay: float = Field(5.0e-4, ge=0)       # voc12.yaml WEIGHT_DECAY 5.0e-4
    poly_power: float = Field(0.9, gt=0)            # voc12.yaml POLY_POWER 0.9
    crop_size: int = Field(321, ge=16, le=MAX_CROP)  # paper 4.1 / voc12.yaml SIZE.TRAIN 321 (COCO 481)
    scales: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])  # voc12.yaml SCALES
    hflip: bool = True                              # base.py _augmentation: flip=True
    # Mixed precision on CUDA only (the CPU always runs float32). Not in the paper or [42], which
    # train in float32: this project's choice for speed; "off" gives their behaviour.
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    checkpoint_every: int = Field(5000, ge=1)       # voc12.yaml ITER_SAVE 5000
    keep_checkpoints: int = Field(2, ge=1)          # this project: older training states are deleted
    log_every: int = Field(20, ge=1)                # voc12.yaml AVERAGE_LOSS 20 (moving-average window)
    # Re-training (appendix A.1): train on labels whose uncertain pixels are 255, fill those from the
    # first network's predictions, train again. VOC only ("not for the MS COCO dataset").
    # Train it on refine_maps' retrain_labels.jsonl (walk value > 0.3 foreground, < 0.2 background).
    retrain: bool = True
    # "train the network again": the paper does not say from which weights; we restart from
    # init_weights ("initial"); "first_round" continues from the first network.
    retrain_init: Literal["initial", "first_round"] = "initial"
    # Test time: main.py test scores the MSC output of the whole image, no flip; CRF is its
    # separate ``crf`` command with DEEPLAB_CRF. Extra scales / flip average the softmax.
    test_scales: list[float] = Field(default_factory=lambda: [1.0])
    test_flip: bool = False
    use_crf: bool = False
    crf: CrfConfig = Field(default_factory=lambda: DEEPLAB_CRF.model_copy())
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "voc")
            if preset not in DEEPLAB_PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(DEEPLAB_PRESETS)}")
            return {**DEEPLAB_PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> DeepLabTrainConfig:
        if not self.scales or not self.test_scales:
            raise ValueError("scales and test_scales need at least one value")
        return self
