"""The typed settings of the two networks trained by plain supervised learning: the classifier
(the chain's first stage, whose CAM RIB starts from) and DeepLab (the last, trained on the
pseudo-masks). Importable without torch; the API validates training requests with them.
Defaults cite IRN's ``train_cam.py`` / ``run_sample.py`` and the paper's appendix A.1 on each field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rib_core.config.presets import Preset
from rib_core.config.stage_configs import (
    CROP_HELP,
    LR_HELP,
    MAX_BATCH,
    MAX_CROP,
    MAX_EPOCHS,
    MAX_ITERATIONS,
    MAX_WORKERS,
    MOMENTUM_HELP,
    POLY_HELP,
    PRESET_HELP,
    RESIZE_HELP,
    SEED_HELP,
    WEIGHT_DECAY_HELP,
    WORKERS_HELP,
    Backbone,
    CrfConfig,
    ModelKind,
    SideRange,
    StageConfig,
)

# The from-scratch recipe's values where they differ from IRN's (measured on MNIST scenes of
# several recipes: docs/USAGE.md "The classifier", benchmarks/classifier_recipes.py). A setting given
# explicitly wins over these.
SCRATCH_RECIPE: dict[str, Any] = {
    "arch": "resnet18", "batch_size": 8, "epochs": 12, "lr": 1e-3, "weight_decay": 0.05,
    "warmup_epochs": 1, "from_scratch": True, "colour_augment": True,
}


class ClassifierTrainConfig(StageConfig):
    """Classifier training; defaults are IRN's (``run_sample.py`` and ``step/train_cam.py``).

    ``recipe="scratch"`` replaces the defaults by :data:`SCRATCH_RECIPE` (explicit settings win).
    """

    recipe: Literal["irn", "scratch"] = Field("irn", description="irn: fine-tune ImageNet weights as IRN does; "
                                              "scratch: this project's recipe for a backbone trained from nothing")
    arch: Backbone = Field("resnet50", description="backbone: resnet18/34/50/101 (IRN: resnet50)")
    # IRN run_sample.py --cam_batch_size 16
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="images per step")
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS, description="passes over the data set (with stop=plateau: the most "
                                                            "passes)")  # --cam_num_epoches 5
    # IRN trains a fixed length. "plateau" is this project's (issue 24): the LR schedule still runs
    # over `epochs`, and the rule only cuts it short (rib_core.classifier.train, docs/USAGE.md).
    stop: Literal["fixed", "plateau"] = Field(
        "fixed", description="fixed: train `epochs` passes (IRN); plateau: end when validation mAP has not improved "
                             "by min_delta for `patience` passes and keep the best pass's weights (needs a validation "
                             "manifest; the learning-rate schedule still spans `epochs`)")
    patience: int = Field(2, ge=1, le=MAX_EPOCHS, description="plateau: passes without improvement that end training")
    min_delta: float = Field(0.005, ge=0, lt=1, description="plateau: the least rise of validation mAP (0-1) that "
                                                            "counts as an improvement")
    lr: float = Field(0.1, gt=0, description=LR_HELP)  # --cam_learning_rate 0.1 (x10 on the classifier)
    weight_decay: float = Field(1e-4, ge=0, description=WEIGHT_DECAY_HELP)  # --cam_weight_decay 1e-4
    # what IRN's PolyOptimizer really passes to SGD (optim.py)
    momentum: float = Field(1e-4, ge=0, description=MOMENTUM_HELP)
    poly_power: float = Field(0.9, gt=0, description=POLY_HELP)  # PolyOptimizer's exponent
    warmup_epochs: float = Field(0, ge=0, description="scratch recipe: linear warm-up before the cosine decay")
    crop_size: int = Field(512, ge=16, le=MAX_CROP, description=CROP_HELP)  # train_cam.py crop_size=512
    resize_long: SideRange = Field((320, 640), description=RESIZE_HELP)  # train_cam.py resize_long=(320, 640)
    hflip: bool = Field(True, description="random horizontal flips")  # train_cam.py hor_flip=True
    colour_augment: bool = Field(False, description="random channel order and greyscale (scratch recipe)")
    # IRN fine-tunes ImageNet weights: stem frozen, stage 2 detached, BN statistics frozen. From
    # scratch (the demo: no ImageNet weights here) every stage must learn, with batch statistics
    # that are then frozen for CAM and RIB. See CamNet.set_from_scratch.
    from_scratch: bool = Field(False, description="train every stage, batch-norm statistics included (no ImageNet "
                                                  "weights); false: IRN's frozen stem and statistics")
    init_weights: str | None = Field(None, description="backbone weights, path or s3://: a torchvision ResNet "
                                     "state dict or a classifier checkpoint (ours or IRN's)")
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description=WORKERS_HELP)
    seed: int = Field(0, description=SEED_HELP)

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") == "scratch":
            return {**SCRATCH_RECIPE, **data}
        return data



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


class DeepLabTrainConfig(StageConfig):
    """DeepLab training and inference; ``preset`` fills the dataset-specific values not given."""

    preset: Preset = Field("voc", description=PRESET_HELP + " (paper appendix A.1)")
    # paper 4.1: DeepLab-v2-ResNet101 of [42]
    model: ModelKind = Field("deeplabv2", description="segmentation head: DeepLab v2 (ASPP sum) or v3")
    # paper 4.1 (resnet18/34/50 for tests and small jobs)
    arch: Backbone = Field("resnet101", description="backbone: resnet18/34/50/101 (paper: resnet101)")
    atrous_rates: list[int] = Field(default_factory=lambda: [6, 12, 18, 24],  # voc12.yaml ATROUS_RATES
                                    description="dilation rates of the ASPP branches")
    msc_scales: list[float] = Field(default_factory=lambda: [0.5, 0.75],  # DeepLabV2_ResNet101_MSC scales
                                    description="extra input scales of the multi-scale training loss")
    # main.py: model.module.base.freeze_bn()
    freeze_bn: bool = Field(True, description="keep the backbone's batch-norm statistics frozen")
    # Paper 4.1: "an initial model pre-trained on the ImageNet dataset". Path or s3:// URI of a
    # torchvision ResNet state dict, a CAM classifier or a DeepLab checkpoint; never downloaded.
    init_weights: str | None = Field(None, description="initial weights, path or s3://: a torchvision ResNet state "
                                     "dict, a classifier or a DeepLab checkpoint; null: random")
    # appendix A.1 (deeplab-pytorch: 5 x ITER_SIZE 2)
    batch_size: int = Field(10, ge=1, le=MAX_BATCH, description="images per step")
    # appendix A.1 VOC (COCO 100k; voc12.yaml: 20k)
    iterations: int = Field(30_000, ge=1, le=MAX_ITERATIONS, description="training steps")
    lr: float = Field(2.0e-4, gt=0, description=LR_HELP)  # appendix A.1 VOC (COCO 2.5e-4; voc12.yaml LR 2.5e-4)
    # main.py get_params "10x" (biases "20x", no decay)
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate factor of the head (its biases get twice it)")
    momentum: float = Field(0.9, ge=0, description=MOMENTUM_HELP)  # voc12.yaml MOMENTUM 0.9
    weight_decay: float = Field(5.0e-4, ge=0, description=WEIGHT_DECAY_HELP)  # voc12.yaml WEIGHT_DECAY 5.0e-4
    poly_power: float = Field(0.9, gt=0, description=POLY_HELP)  # voc12.yaml POLY_POWER 0.9
    # paper 4.1 / voc12.yaml SIZE.TRAIN 321 (COCO 481)
    crop_size: int = Field(321, ge=16, le=MAX_CROP, description=CROP_HELP)
    scales: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5],  # voc12.yaml SCALES
                                description="random rescaling factors of the training images")
    hflip: bool = Field(True, description="random horizontal flips")  # base.py _augmentation: flip=True
    # Mixed precision on CUDA only (the CPU always runs float32). Not in the paper or [42], which
    # train in float32: this project's choice for speed; "off" gives their behaviour.
    amp: Literal["bf16", "fp16", "off"] = Field("bf16", description="mixed precision on CUDA (the CPU runs "
                                                                    "float32); off: float32 as the paper")
    # voc12.yaml ITER_SAVE 5000
    checkpoint_every: int = Field(5000, ge=1, description="steps between saved training states")
    # this project: older training states are deleted
    keep_checkpoints: int = Field(2, ge=1, description="training states kept (older ones are deleted)")
    # voc12.yaml AVERAGE_LOSS 20 (moving-average window)
    log_every: int = Field(20, ge=1, description="steps between progress reports (loss averaged over them)")
    # Re-training (appendix A.1): train on labels whose uncertain pixels are 255, fill those from the
    # first network's predictions, train again. VOC only ("not for the MS COCO dataset").
    # Train it on refine_maps' retrain_labels.jsonl (walk value > 0.3 foreground, < 0.2 background).
    retrain: bool = Field(True, description="second round: fill the ignored pixels with the first network's "
                                            "predictions and train again (VOC, paper appendix A.1)")
    # "train the network again": the paper does not say from which weights; we restart from
    # init_weights ("initial"); "first_round" continues from the first network.
    retrain_init: Literal["initial", "first_round"] = Field(
        "initial", description="weights the second round starts from: init_weights, or the first network's")
    # Test time: main.py test scores the MSC output of the whole image, no flip; CRF is its
    # separate ``crf`` command with DEEPLAB_CRF. Extra scales / flip average the softmax.
    test_scales: list[float] = Field(default_factory=lambda: [1.0], description="input scales averaged at test time")
    test_flip: bool = Field(False, description="also average the flipped image at test time")
    use_crf: bool = Field(False, description="refine the test predictions with the CRF")
    crf: CrfConfig = Field(default_factory=lambda: DEEPLAB_CRF.model_copy(),
                           description="the test-time CRF (default: deeplab-pytorch's, on probabilities)")
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description=WORKERS_HELP)
    seed: int = Field(0, description=SEED_HELP)

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
