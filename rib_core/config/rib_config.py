"""Configuration of the RIB process (paper section 3.2 and 4.1, ``obtain_RIB_CAM.py``).

Where the paper and the official code differ, the code's behaviour is the default and the paper's
variant is an option; ``docs/FIDELITY.md`` lists each such choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from rib_core.config.presets import Preset, with_preset
from rib_core.config.stage_configs import (
    MAX_CROP,
    MOMENTUM_HELP,
    POLY_HELP,
    PRESET_HELP,
    WEIGHT_DECAY_HELP,
    SideRange,
    StageConfig,
)

# PASCAL VOC's images are 500 px on the long side (nearly all 500x375 or 375x500): the scale that
# the companion crop (512) and resize-long (320-640) of the official code were set for.
VOC_LONG_SIDE = 500
MAX_LR = 1e-2  # bound of lr, and of the step the lr_rule "first_step" may pick
MAX_IMAGES_PER_BATCH = 64  # bound of max_images_per_batch, and the block rib_core.rib.batching.run_rib loads
MAX_SCALE = 4.0  # bound of the map and loss scales: twice the paper's largest (2.0, paper 4.1)
Scales = tuple[Annotated[float, Field(gt=0, le=MAX_SCALE)], ...]


# VOC: the field defaults (obtain_RIB_CAM.py). COCO: obtain_RIB_CAM_coco.py's --RIB_lr 0.000005,
# --RIB_batch 15, --score_th 0.5, --stop_th 1000, --explode_ratio 0.8; its gndp2d (misc/torchutils.py)
# normalises only the first 20 channels, so COCO's classes 21-80 pool by GAP (gndrp_classes 20).
RIB_PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    "coco": {"lr": 5e-6, "companions": 15, "tau": 0.5, "margin": 1000, "explode_ratio": 0.8, "gndrp_classes": 20},
}


def image_seed(seed: int, image_id: str) -> int:
    """The RIB seed of image ``image_id`` (its companion draws), from ``RibConfig.seed`` and the id.

    One rule for every path (``rib rib``, the demo job, the service's workers): keyed on the id
    alone, an image gets the same draws, hence the same M, whatever manifest, chunk or batch it
    comes in. A hash, not Python's ``hash``, so it is the same in every process.
    """
    digest = hashlib.blake2b(f"{seed}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class RibPlan:
    """How RIB runs on one device: every "auto" of a :class:`RibConfig` resolved, once per task (an
    image chunk, a ``run_rib`` run, a ``process_many`` call) and passed down to the engines."""

    batched: bool          # several images per step (batched engine), else one at a time (plain engine)
    bf16: bool             # bfloat16 compute in channels_last, else float32
    images_per_step: int   # images per batched step; 0 = as many as the free device memory holds
    images_loaded: int     # images a manifest run loads at a time (rib_core.rib.batching.run_rib)

    @property
    def engine(self) -> str:
        return "batched" if self.batched else "plain"


class RibConfig(StageConfig):
    """Per-image RIB fine-tuning; ``preset`` fills the data-set-specific values not given."""

    preset: Preset = Field("voc", description=PRESET_HELP)
    # K: paper 4.1; --RIB_iter 10
    iterations: int = Field(10, ge=1, le=100, description="K: fine-tuning steps per image")
    lr: float = Field(8e-6, gt=0, le=MAX_LR, description="lambda: learning rate of the per-image fine-tuning "
                                                         "(decays over the K steps)")  # paper 4.1; --RIB_lr 0.000008
    # The step size. "fixed": lr as given (the official code). "first_step" (ours): each image's
    # own lambda, set before its first update so that, to first order, the first step lowers L_RIB
    # by step_gain x the sum of |labelled logits| of its batch: lambda = step_gain * sum|y| /
    # sum_g m_g ||grad_g L||^2 (m_g: 1 backbone, 10 classifier). 8e-6 was set for an SGD-trained
    # ImageNet ResNet-50; a classifier whose gradients are 10x smaller gets a 10x larger lambda
    # (benchmarks/bench_lr.py measures both rules). lr stays the rate weight decay acts at.
    lr_rule: Literal["fixed", "first_step"] = Field(
        "fixed", description="fixed: every image steps at lr (the official code); first_step: each image's step "
                             "is set by its first step's gradient so that it lowers the loss by step_gain of its "
                             "labelled logits (docs/FIDELITY.md)")
    # step_gain 0.3: on the benchmark's tuning halves 0.3 and 1.0 tied (0.03 was lower); the
    # smaller of the two. It moves the first step's target logits by about 30%.
    step_gain: float = Field(0.3, gt=0, le=1, description="first_step: the share of the labelled logits' sum the "
                                                          "first step should lower the loss by")
    weight_decay: float = Field(1e-4, ge=0, description=WEIGHT_DECAY_HELP)  # --cam_weight_decay, to PolyOptimizer
    # PolyOptimizer hands weight_decay to SGD as momentum
    momentum: float = Field(1e-4, ge=0, description=MOMENTUM_HELP)
    # PolyOptimizer's "momentum" attribute is the exponent
    poly_power: float = Field(0.9, gt=0, description=POLY_HELP)
    # --RIB_batch 20 crops per step (paper: B - 1 = 19)
    companions: int = Field(20, ge=0, le=256, description="crops of other images (the companion manifest's) in each "
                                                          "step's batch, as negatives")
    # --pooling gndp
    pooling: Literal["gndrp", "gap"] = Field("gndrp", description="gndrp: global non-dominant region pooling "
                                                                  "(paper Eq. 3); gap: global average pooling")
    # --score_th 0.4 (paper 4.1)
    tau: float = Field(0.4, gt=0, le=1, description="GNDRP leaves out the pixels whose normalised map is above tau")
    # Official gndp2d zeroes pixels above tau but divides by all pixels |U|; the paper's Eq. 3
    # divides by |U_tau|. "all" = code (default), "kept" = paper.
    gndrp_denominator: Literal["all", "kept"] = Field(
        "all", description="GNDRP divides by all pixels (official code) or by the pixels kept (paper Eq. 3)")
    # Official gndp2d loops over channels 0-19 only (VOC's 20 classes): on COCO, classes 20-79 keep
    # every pixel (GAP) even when labelled. None = GNDRP on every class (paper); 20 = that code.
    gndrp_classes: int | None = Field(None, ge=0, description="GNDRP on the first N classes only, GAP on the rest "
                                                              "(official COCO code: 20); null: every class")
    # m: paper 4.1; --stop_th 600
    margin: float = Field(600, gt=0, description="m: the margin on the target classes' logits (see margin_mode)")
    # Code: no min(m, y) in the loss; stop after the step where |sum of target logits| > m.
    # Paper: L = -sum min(m, y_c), run all K steps.
    margin_mode: Literal["stop", "clamp"] = Field(
        "stop", description="stop: stop after the step whose summed target logits exceed m (official code); "
                            "clamp: the loss takes min(m, logit) and all K steps run (paper)")
    # --explode_th 0.3
    explode_threshold: float = Field(0.3, gt=0, le=1, description="a map value above it counts as covered in the "
                                                                  "explosion check")
    # --explode_ratio 0.7; 1.0 disables the check
    explode_ratio: float = Field(0.7, gt=0, le=1, description="fine-tuning stops when the labelled classes' maps "
                                                              "cover more than this share of the image; 1.0: never")
    # obtain_RIB_CAM.py skips scale 0.5 in the loss
    loss_scales: Scales = Field((1.0, 1.5, 2.0), min_length=1, description="image scales in the loss; each one of "
                                                                            "map_scales")
    # --cam_scales, all used for M
    map_scales: Scales = Field((1.0, 0.5, 1.5, 2.0), min_length=1, description="image scales whose maps sum to M")
    # Code sums the CAMs computed before each update (theta_0 .. theta_{K-1}); the paper sums
    # theta_0 .. theta_K. "before_updates" = code (default), "all_iterates" = paper.
    map_iterates: Literal["before_updates", "all_iterates"] = Field(
        "before_updates", description="M sums the maps before each update (official code) or of every iterate, "
                                      "the last included (paper)")
    # companion crops: VOC12RIBDataset crop_size=512
    crop_size: int = Field(512, ge=16, le=MAX_CROP, description="side of the companions' square crops (px)")
    # companion resize_long=(320, 640)
    resize_long: SideRange = Field((320, 640), description="companions are resized to a random long side in this "
                                                           "range (px) before cropping")
    # each image draws from image_seed(seed, its id)
    seed: int = Field(0, description="seed of the companion draws (each image's own, from this and its id)")
    # Speed, not in the paper or the code (which run float32): "auto" = bfloat16 autocast and
    # channels_last on CUDA, plain float32 on the CPU. M is accumulated in float32 either way.
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="compute precision; auto: bfloat16 on CUDA, float32 on the CPU (M is summed in float32)")
    # How images are run: "plain" one at a time in the official loop's structure, "batched" several
    # images per step (RibRunner.run_many, companions cropped on the device), "auto" = batched on
    # CUDA, plain on the CPU (where batching does not pay: benchmarks/bench_rib.py).
    engine: Literal["auto", "batched", "plain"] = Field(
        "auto", description="plain: one image at a time; batched: several per step; auto: batched on CUDA only")
    # Images per batched step; 0 = as many as the free device memory holds (measured on the first
    # batch of each image size), 1 on the CPU.
    max_images_per_batch: int = Field(0, ge=0, le=MAX_IMAGES_PER_BATCH, description="images per batched step; 0: as "
                                      "many as the free device memory holds")
    # this project's speed option, not in the paper or the code
    compile: bool = Field(False, description="torch.compile the batched engine's stages and the classifier")

    @model_validator(mode="after")
    def _loss_scales_are_map_scales(self) -> RibConfig:
        if not set(self.loss_scales) <= set(self.map_scales):
            raise ValueError("every loss scale must be one of the map scales")
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data, RIB_PRESETS)

    def plan(self, device: str) -> RibPlan:
        """Engine, precision and batch size of RIB on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
        cuda = device.startswith("cuda")
        batched = self.engine == "batched" or (self.engine == "auto" and cuda)
        return RibPlan(batched=batched, bf16=self.precision == "bf16" or (self.precision == "auto" and cuda),
                       images_per_step=(self.max_images_per_batch or (0 if cuda else 1)) if batched else 1,
                       images_loaded=MAX_IMAGES_PER_BATCH if batched else 1)

    def fitted_to(self, long_side: int) -> tuple[RibConfig, str | None]:
        """This config for images whose median long side is ``long_side`` px, and a note saying
        what was done. VOC's companion sizes resize every image to a long side of 320-640: fine for
        images at least that large, but smaller ones would be enlarged up to 640 / ``long_side``
        times, against a target seen at its own size. Then the sizes not given explicitly are VOC's
        scaled by ``long_side`` / 500; given ones are
        kept, with a warning."""
        if long_side >= self.resize_long[0]:
            return self, None
        scale = long_side / VOC_LONG_SIDE
        low, high = RibConfig.model_fields["resize_long"].default
        derived: dict[str, Any] = {"crop_size": max(16, round(RibConfig.model_fields["crop_size"].default * scale)),
                                   "resize_long": (max(16, round(low * scale)), max(16, round(high * scale)))}
        update = {k: v for k, v in derived.items() if k not in self.model_fields_set}
        if not update:
            return self, (f"warning: RIB's crop_size {self.crop_size} and resize_long {self.resize_long[0]}-"
                          f"{self.resize_long[1]} enlarge these images (median long side {long_side} px) "
                          f"{self.resize_long[0] / long_side:.1f}-{self.resize_long[1] / long_side:.1f}x; "
                          f"leave them unset to derive {derived['crop_size']} and {derived['resize_long'][0]}-"
                          f"{derived['resize_long'][1]} from the images")
        fitted = self.model_copy(update=update)
        return fitted, (f"RIB's companion sizes follow the images (median long side {long_side} px, which VOC's "
                        f"resize-long 320-640 would enlarge): crop_size {fitted.crop_size}, resize_long "
                        f"{fitted.resize_long[0]}-{fitted.resize_long[1]} (VOC's scaled by {long_side}/"
                        f"{VOC_LONG_SIDE}; given values kept); set crop_size / resize_long to choose others")

    def uses_bf16(self, device: str) -> bool:
        """``plan(device).bf16``."""
        return self.plan(device).bf16

    def batched(self, device: str) -> bool:
        """``plan(device).batched``."""
        return self.plan(device).batched
