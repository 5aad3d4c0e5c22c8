"""DeepLab training and inference settings with the paper's per-data-set presets.

Apart from the training code and free of torch, so that the API can validate a training job's
settings without loading the network code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.crf_config import CrfConfig
from rib_core.presets import Preset, with_preset

ModelKind = Literal["deeplabv2", "deeplabv3"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101"]  # the keys of networks.BACKBONES

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

# Settings that define a run: a resumed run must use the same ones.
RUN_FIELDS = ("model", "arch", "atrous_rates", "msc_scales", "freeze_bn", "init_weights", "batch_size",
              "iterations", "lr", "head_lr_mult", "momentum", "weight_decay", "poly_power", "crop_size",
              "scales", "hflip", "seed")


class DeepLabTrainConfig(BaseModel):
    """DeepLab training and inference; ``preset`` fills the dataset-specific values not given."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "voc"
    model: ModelKind = "deeplabv2"                  # paper 4.1: DeepLab-v2-ResNet101 of [42]
    arch: Backbone = "resnet101"                    # paper 4.1 (resnet18/34/50 for tests and small jobs)
    atrous_rates: list[int] = Field(default_factory=lambda: [6, 12, 18, 24])  # voc12.yaml ATROUS_RATES
    msc_scales: list[float] = Field(default_factory=lambda: [0.5, 0.75])      # DeepLabV2_ResNet101_MSC scales
    freeze_bn: bool = True                          # main.py: model.module.base.freeze_bn()
    # Paper 4.1: "an initial model pre-trained on the ImageNet dataset". Path or s3:// URI of a
    # torchvision ResNet state dict, a CAM classifier or a DeepLab checkpoint; never downloaded.
    init_weights: str | None = None
    batch_size: int = Field(10, ge=1)               # appendix A.1 (deeplab-pytorch: 5 x ITER_SIZE 2)
    iterations: int = Field(30_000, ge=1)           # appendix A.1 VOC (COCO 100k; voc12.yaml: 20k)
    lr: float = Field(2.0e-4, gt=0)                 # appendix A.1 VOC (COCO 2.5e-4; voc12.yaml LR 2.5e-4)
    head_lr_mult: float = Field(10.0, gt=0)         # main.py get_params "10x" (biases "20x", no decay)
    momentum: float = Field(0.9, ge=0)              # voc12.yaml MOMENTUM 0.9
    weight_decay: float = Field(5.0e-4, ge=0)       # voc12.yaml WEIGHT_DECAY 5.0e-4
    poly_power: float = Field(0.9, gt=0)            # voc12.yaml POLY_POWER 0.9
    crop_size: int = Field(321, ge=16)              # paper 4.1 / voc12.yaml SIZE.TRAIN 321 (COCO 481)
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
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, DEEPLAB_PRESETS)

    @model_validator(mode="after")
    def _check(self) -> DeepLabTrainConfig:
        if not self.scales or not self.test_scales:
            raise ValueError("scales and test_scales need at least one value")
        return self
